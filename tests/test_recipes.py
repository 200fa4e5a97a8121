"""configs/recipes/*.yaml are `spin-train --config` files: every key is a setting, and every value
reaches the parsed settings as written."""
import glob
import os

import pytest
import yaml

from spin_trainer.options import parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "recipes", "*.yaml")))


def test_the_paper_recipe_is_there():
    assert os.path.join(ROOT, "configs", "recipes", "spin-paper.yaml") in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_a_recipe_parses_and_every_value_is_applied(path):
    with open(path, encoding="utf-8") as f:
        written = yaml.safe_load(f)
    config = parse_config(["--config", path])   # unknown keys and bad values raise UsageError
    applied = config.as_options()
    for key, value in written.items():
        expected = pytest.approx(value) if isinstance(value, (float, list)) else value
        assert applied[key] == expected, key
    # The command line still overrides the file.
    assert parse_config(["--config", path, "--seed", "7"]).run.seed == 7


def test_a_recipe_runs_fewer_iterations_with_its_first_values():
    """The paper's four iterations of --beta and --lr: a run of two takes the first two, so a short
    run (and one extended later with --resume --iterations N) uses the recipe as written."""
    path = os.path.join(ROOT, "configs", "recipes", "spin-paper.yaml")
    config = parse_config(["--config", path, "--iterations", "2"]).check()
    assert config.per_iteration("beta") == [0.1, 0.1]
    assert config.per_iteration("lr") == [5e-7, 5e-7]
    config = parse_config(["--config", path, "--iterations", "4"]).check()
    assert config.per_iteration("beta") == [0.1, 0.1, 0.1, 5.0]
