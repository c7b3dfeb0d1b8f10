"""nova-flavor-sync: rewrite stale flavor extra_specs copies in nova_api.request_specs."""

__version__ = "0.1.0"
