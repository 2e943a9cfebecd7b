"""Suite files: the README's example parses, cells and their ids, regimes, errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runners.suite import SuiteError, load_suite

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_suite_loads(tmp_path: Path) -> None:
    example = re.search(r"```toml\n(.*?)```", README.read_text(), re.S).group(1)
    path = tmp_path / "mysuite.toml"
    path.write_text(example)
    suite = load_suite(path)
    assert (
        suite.jobs == 2
        and suite.prune["round_to"] == 8
        and suite.method_options["dcodp"]["coupling"] == "root"
    )
    methods = [c.method for c in suite.cells()]
    assert methods == ["base", "l1", "l1", "random", "random"]


def test_packaged_suites_load() -> None:
    smoke = load_suite("smoke")
    cells = smoke.cells()
    assert len({c.cell_id for c in cells}) == len(cells)
    bases = [c for c in cells if c.method == "base"]
    assert {c.regime for c in bases} == {"plain", "ldt"}  # LDT's baseline trains with its loss
    ldt = next(c for c in cells if c.method == "ldt")
    plain = next(c for c in cells if c.method == "l1" and c.experiment == ldt.experiment)
    assert ldt.baseline_key != plain.baseline_key
    assert load_suite("ldt_ablation").cells()


def test_seeded_smoke_is_the_smoke_grid_with_three_seeds() -> None:
    smoke, seeded = load_suite("smoke"), load_suite("smoke-seeds")
    assert smoke.seeds == [0] and seeded.seeds == [0, 1, 2]
    one, three = {c.cell_id for c in smoke.cells()}, {c.cell_id for c in seeded.cells()}
    assert one < three and len(three) == 3 * len(one)  # seed 0's cells are smoke's own cells
    assert {k: v for k, v in seeded.raw.items() if k not in ("name", "description", "seeds")} == {
        k: v for k, v in smoke.raw.items() if k not in ("name", "description", "seeds")
    }


def test_cell_ids_change_with_what_shapes_them(tmp_path: Path) -> None:
    text = 'methods = ["l1"]\ntargets = ["params:0.3"]\n[[experiments]]\ndetector = "fcos"\n'
    text += 'dataset = "synthetic-coco"\n'
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(text)
    b.write_text(text.replace("[[experiments]]", "[finetune]\nepochs = 5\n[[experiments]]"))
    ca, cb = load_suite(a).cells(), load_suite(b).cells()
    assert ca[0].cell_id == cb[0].cell_id  # the base row does not depend on fine-tuning
    assert ca[1].cell_id != cb[1].cell_id and ca[1].baseline_key == cb[1].baseline_key


def test_training_readings_get_one_baseline_each(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        'methods = ["ldt:strong", "ldt", "ldt:no-attention", "ldt:strong-too"]\ntargets = ["params:0.3"]\n'
        '[method_options."ldt:strong"]\nalpha = 0.05\n[method_options."ldt:strong-too"]\nalpha = 0.05\n'
        'location_attention = false\n[method_options."ldt:no-attention"]\nlocation_attention = false\n'
        '[[experiments]]\ndetector = "fcos"\ndataset = "synthetic-coco"\n'
    )
    cells = load_suite(path).cells()
    base = {c.regime: c for c in cells if c.method == "base"}
    # the default reading keeps the regime's name; another reading is named after its variant
    assert set(base) == {"plain", "ldt", "ldt:strong"}
    assert base["ldt:strong"].regime_options["alpha"] == 0.05 and base["ldt"].regime_options["alpha"] == 5e-3
    assert len({c.baseline_key for c in base.values()}) == 3
    regime = {c.method: c.regime for c in cells if c.method != "base"}
    assert regime == {
        "ldt:strong": "ldt:strong",
        "ldt": "ldt",
        "ldt:no-attention": "ldt",
        "ldt:strong-too": "ldt:strong",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('bogus = 1\n[[experiments]]\ndetector = "fcos"\ndataset = "synthetic-coco"\n', "unknown key"),
        ('[train]\nepochs = 1\nspeed = 2\n[[experiments]]\ndetector = "fcos"\ndataset = "coco"\n', "speed"),
        ('[[experiments]]\ndetector = "yolo"\ndataset = "synthetic-coco"\n', "unknown detector 'yolo'"),
        ('[[experiments]]\ndetector = "fcos"\ndataset = "pascal"\n', "unknown dataset 'pascal'"),
        ('[[experiments]]\ndetector = "fcos"\n', "names no dataset"),
        ('methods = ["l1"]\n', "no [[experiments]]"),
    ],
)
def test_bad_suites_are_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SuiteError, match=re.escape(message)):
        load_suite(path)


def test_px_ablation_trains_nothing_the_smoke_has_not() -> None:
    smoke, ablation = load_suite("smoke"), load_suite("px_ablation")
    smoke_baselines = {c.baseline_key for c in smoke.cells()}
    cells = ablation.cells()
    assert {c.baseline_key for c in cells} <= smoke_baselines  # run with the smoke's work dir
    methods = {c.method for c in cells}
    assert {"px", "px:faithful", "px:global", "px:bn-variance", "random", "random:draw5"} <= methods
    faithful = next(c for c in cells if c.method == "px:faithful")
    assert faithful.method_options == {"scope": "global", "bn_variance": True}
