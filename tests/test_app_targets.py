"""The attribution page's target, baseline, positions and aggregation selectors and its localisation check
(AppTest, on the small built-in default; fixtures and helpers from test_app)."""

from __future__ import annotations

import pytest

from simu_core import data as qa
from simu_core.attribution import attribute
from simu_core.localise import localise
from simu_core.masks import make_mask
from simu_core.methods import preset_config
from tests.test_app import app, app_home, attribution_ready, poll, texts  # noqa: F401 (fixtures)


def test_fact_target_consistency_selection_and_its_localisation_check(app, full_model, builtin_dir):  # noqa: F811
    attribution_ready(app)
    assert {"Target", "Baseline", "Positions"} <= {s.label for s in app.selectbox}
    app.selectbox(key="att_target_True").set_value("fact").run()  # grad_x_act: on the own path
    poll(app, lambda a: len(a.get("plotly_chart")) >= 3 or a.error, "the fact-target charts")
    app.selectbox(key="att_score").set_value("forget").run()
    app.selectbox(key="att_dual").set_value("include").run()
    app.selectbox(key="att_aggregate").set_value("consistency").run()
    app.button(key="launch_localise").click().run()
    poll(app, lambda a: len(a.dataframe) > 0 or a.error, "the localisation table")
    assert not app.error, texts(app.error)
    table = app.dataframe[0].value
    # the same check through the library: same scores, selection and retain items
    preset = preset_config("simu").mask
    forget = qa.load_data("builtin:forget10", root=builtin_dir)
    retain = qa.load_data("builtin:retain10", root=builtin_dir)
    part = qa.QADataset(retain.name, retain.items[: preset.retain_limit])
    how = {"method": "grad_x_act", "target": "fact", "per_item": True}
    mask = make_mask(attribute(full_model, forget, **how), preset.rule, preset.value,
                     retain=attribute(full_model, part, **how), aggregate="consistency")  # fmt: skip
    held_out = retain.items[preset.retain_limit : preset.retain_limit + 400] or part.items
    expected = localise(full_model, mask, forget, qa.QADataset("r", held_out), n_random=20)
    assert list(table["tokens"]) == ["answer", "fact"]
    assert table["forget rise"][1] == pytest.approx(expected.rises["fact"]["forget_rise"], abs=1e-4)
    assert table["retain rise"][1] == pytest.approx(expected.rises["fact"]["retain_rise"], abs=1e-4)
