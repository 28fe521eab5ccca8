-- Expand: products get a title, which replaces name. Until every reader has moved to a version that shows
-- title, the two are kept equal in both directions, so writers through any version see the same product.
ALTER TABLE products ADD COLUMN title text;
UPDATE products SET title = name;
ALTER TABLE products ALTER COLUMN title SET NOT NULL;

CREATE FUNCTION products_sync_title() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.title := coalesce(NEW.title, NEW.name);
        NEW.name := coalesce(NEW.name, NEW.title);
    ELSIF NEW.title IS DISTINCT FROM OLD.title THEN
        NEW.name := NEW.title;
    ELSIF NEW.name IS DISTINCT FROM OLD.name THEN
        NEW.title := NEW.name;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER products_sync_title BEFORE INSERT OR UPDATE ON products
    FOR EACH ROW EXECUTE FUNCTION products_sync_title();
