"""YAML as ``yaml.safe_load`` reads it, parsed by libyaml's C parser where PyYAML has it (its wheels
do): about ten times faster. The check stage parses dvc.yaml and every stage params.yaml on each
run; a study, the schema's tests and `exp-run` parse them hundreds of times."""

import yaml

SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load(text: str):
    """The data of one YAML document, safely (plain data only), like ``yaml.safe_load``."""
    return yaml.load(text, Loader=SafeLoader)
