"""The loop state's files (state_file.py): every type round-trips, and token ids (the iteration's
pairs and generations, about 250M ids each at UltraChat's size) go to the tensors file as int32
buffers, never one JSON number per token."""
import json
import os

import torch

from spin_trainer.data import Example
from spin_trainer.state_file import STRUCTURE_FILE, read_state, write_state


def test_state_round_trips_with_token_ids_outside_the_json(tmp_path):
    examples = [Example((1, 50_000, 7), (9, 2)), Example((3,), (2,)), Example((4, 4), (5, 6, 2))]
    generated = [[11, 12, 2], [], [2_000_000_000]]
    state = {"data": {"examples": examples, "generated": generated, "ref_logps": torch.randn(3, 2),
                      "history": [{"loss": 0.5, "acc": 1.0}]},
             "previous_pairs": (examples[:2], generated[:2]), "eval_rows": [{"iteration": 0, "loss": None}],
             "odd": [[1, 2.5], [-100, 3], [True]], "one": Example((8,), (2,))}
    write_state(state, str(tmp_path))
    back = read_state(str(tmp_path))
    assert back["data"]["examples"] == examples and back["data"]["generated"] == generated
    assert back["previous_pairs"][0] == examples[:2] and back["previous_pairs"][1] == generated[:2]
    assert torch.equal(back["data"]["ref_logps"], state["data"]["ref_logps"])
    assert back["data"]["history"] == state["data"]["history"] and back["eval_rows"] == state["eval_rows"]
    assert back["odd"] == state["odd"] and back["one"] == state["one"]   # not token ids: plain JSON, as given
    assert all(type(g) is list and all(type(t) is int for t in g) for g in back["data"]["generated"])

    structure = json.loads((tmp_path / STRUCTURE_FILE).read_text())
    assert set(structure["data"]["examples"]) == {"__examples__"}
    assert set(structure["data"]["generated"]) == {"__token_lists__"}
    assert "50000" not in json.dumps(structure) and "2000000000" not in json.dumps(structure)


def test_large_pair_lists_are_small_on_disk(tmp_path):
    examples = [Example(range(i, i + 200), range(300)) for i in range(500)]
    write_state({"examples": examples, "generated": [list(range(400))] * 500}, str(tmp_path))
    assert os.path.getsize(tmp_path / STRUCTURE_FILE) < 1000
    assert read_state(str(tmp_path))["examples"] == examples
