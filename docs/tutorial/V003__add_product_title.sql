-- Expand: products get a title, which replaces name. This file only changes the table's shape, so the
-- ACCESS EXCLUSIVE lock of its ALTER TABLEs lasts milliseconds: a column without a default and a
-- constraint NOT VALID change no row and scan none. V004 fills title, V005 makes it NOT NULL.
SET LOCAL lock_timeout = '500ms';
SET LOCAL statement_timeout = '5s';
ALTER TABLE products ADD COLUMN title text;
ALTER TABLE products ADD CONSTRAINT products_title_not_null CHECK (title IS NOT NULL) NOT VALID;

-- Until every reader has moved to a version that shows title, the two columns are kept equal in both
-- directions, so writers through any version see the same product; a row written before V004 reaches it
-- gets its title as soon as it is written (which the constraint above already requires).
CREATE FUNCTION products_sync_title() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.title := coalesce(NEW.title, NEW.name);
        NEW.name := coalesce(NEW.name, NEW.title);
    ELSIF NEW.title IS DISTINCT FROM OLD.title THEN
        NEW.name := NEW.title;
    ELSE
        NEW.title := NEW.name;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER products_sync_title BEFORE INSERT OR UPDATE ON products
    FOR EACH ROW EXECUTE FUNCTION products_sync_title();
