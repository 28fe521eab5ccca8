"""The data port's endpoints besides the contracts: the OpenAPI document (``openapi``), the Swagger UI page and
its files (``docs``), and business logic over ``/rpc`` (``rpc``). Each calls into the request path
(``pipeline.identify``, ``access``), never the reverse; ``app`` routes to them."""
