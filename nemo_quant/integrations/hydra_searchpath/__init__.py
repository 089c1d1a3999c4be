"""Hydra search-path plugin, installed as `hydra_plugins.nemo_quant_searchpath` (setup.py maps it).

Hydra imports every module under the `hydra_plugins` namespace and calls each SearchPathPlugin,
so in any Hydra app of an environment where nemo_quant is installed (a regular install: Hydra
does not find plugins through a flat-layout editable one) `+nemo_quant=<quant preset>`,
`+nemo_quant/qlora=<preset>` and `+nemo_quant/export=<preset>` compose our presets. The group
files sit beside this module (setup.py copies conf/quant, conf/qlora and conf/export there).
"""
from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class NemoQuantSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # The presets' `defaults: [schema]` need the typed schemas; registered here, when an app
        # composes, rather than at import, so Hydra apps that never use the group pay nothing.
        from nemo_quant.integrations.hydra_job import register_foreign_schemas

        register_foreign_schemas()
        search_path.append("nemo-quant", f"pkg://{__name__}")
