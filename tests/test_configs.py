"""What the shipped configs claim about each other."""

import pytest
import yaml
from conftest import ROOT

SCHEME_CONFIGS = ["euler", "iiet_r2", "iiet", "iiet_r4", "looped", "rk2", "rk2_gated", "rk4", "pcformer"]


def without_scheme(name: str) -> dict:
    config = yaml.safe_load((ROOT / "conf" / "lm" / f"shakespeare_{name}.yaml").read_text())
    assert config["trainer"].pop("default_root_dir") == f"runs/shakespeare_{name}"
    return config, config["model"]["init_args"].pop("ode")


@pytest.mark.parametrize("name", [n for n in SCHEME_CONFIGS if n != "iiet"])
def test_shakespeare_scheme_configs_differ_only_in_the_scheme(name):
    """docs/USAGE.md says the eight conf/lm/shakespeare_<scheme>.yaml differ only in the scheme (and their run
    folder): everything else equals shakespeare_iiet.yaml, so their results compare schemes and nothing else."""
    (config, ode), (reference, reference_ode) = without_scheme(name), without_scheme("iiet")
    assert config == reference
    assert ode != reference_ode
