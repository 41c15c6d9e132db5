"""Storage-path validation: ``vua-nixl plan`` and ``vua-nixl bench storage``.

* :mod:`.flags`, :mod:`.nbconfig` - nixlbench's flags and its ``--config_file`` TOML files;
* :mod:`.plan` - KV bytes per token / chunk / request for a model, and the matching nixlbench run;
* :mod:`.raw` - nixlbench's storage benchmark replayed through the NIXL Python API;
* :mod:`.store_bench` - the same matrix through ``KVStore.put_many`` / ``get_many``;
* :mod:`.storage` - runs both (and a ``nixlbench`` binary if present) and writes CSV/JSON/PNG;
* :mod:`.cli` - the argparse commands registered by ``vua_nixl.cli``.
"""
