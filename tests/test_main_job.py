"""The main job runs end to end (shortened) and writes its table and plots; evaluation helpers."""

import importlib.util
import json
from pathlib import Path

import torch

from bilevel_dlm.evaluation import decode_answers, encode_prompts
from bilevel_dlm.tasks import build_tokenizer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "memdlm_llada.py"


def test_shortened_main_job_writes_table_and_plots(tmp_path):
    spec = importlib.util.spec_from_file_location("memdlm_llada", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--output", str(tmp_path), "--tasks", "babi", "vt", "--pretrain-steps", "3",
                           "--finetune-steps", "2", "--train-examples", "2", "--eval-examples", "2",
                           "--batch-size", "4", "--reb-steps", "3", "--d-model", "32", "--no-progress"])
    for name in ("results.json", "results.csv", "loss_curves.png", "exposure_bias.png", "accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["accuracy"]) == {"MDLM", "MemDLM (train)", "MemDLM (train + inference)"}
    assert set(saved["accuracy"]["MDLM"]) == {"babi@96", "babi@160", "vt@96", "vt@160", "mean"}
    assert len(saved["exposure_bias"]["MemDLM"]["random"]["ratio"]) == 2
    assert (tmp_path / "results.csv").read_text().count("\n") == 4
    assert results["histories"]["fine-tuning (MemDLM)"]["inner_losses"][0].__len__() == 2
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()


def test_prompts_are_left_padded_and_answers_stop_at_eos():
    tok = build_tokenizer()
    ids, mask = encode_prompts(tok, ["where is mary ?", "mary"], pad_token_id=tok.pad_token_id)
    assert ids.shape == (2, 5) and mask.tolist() == [[1] * 5, [0, 0, 0, 1, 1]]
    assert ids[1, :3].tolist() == [tok.pad_token_id] * 3 and ids[1, 3] == tok.bos_token_id
    kitchen = tok("kitchen", add_special_tokens=False)["input_ids"]
    generated = torch.tensor([kitchen + [tok.eos_token_id] + kitchen, kitchen * 3])
    assert decode_answers(tok, generated) == ["kitchen", "kitchen kitchen kitchen"]
