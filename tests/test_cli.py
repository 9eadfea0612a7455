import json

import pytest

from slimlm.cli import main


def test_unknown_task_fails_before_loading(capsys):
    assert main(["eval", "--model", "does-not-matter", "--tasks", "wikitext2,nonsense"]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s) nonsense" in err and "piqa" in err and "Traceback" not in err


def test_missing_data_dir_is_named(capsys, tmp_path):
    assert main(["eval", "--tasks", "wikitext2", "--data-dir", str(tmp_path / "none")]) == 2
    assert "data directory not found" in capsys.readouterr().err


def test_unknown_model_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert main(["info", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimlm: error:") and "cannot reach the Hugging Face hub" in err


def test_bad_numbers_are_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--seqlen", "0"])
    assert "must be a positive integer" in capsys.readouterr().err


def test_eval_prints_a_table_and_writes_json(tiny_dir, tmp_path, capsys):
    out = tmp_path / "result.json"
    code = main(["eval", "--model", tiny_dir, "--tasks", "pydoc", "--seqlen", "64", "--max-windows", "2",
                 "--kl-reference", tiny_dir, "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| pydoc | ppl |" in printed and "| pydoc | kl_mean |" in printed
    record = json.loads(out.read_text())
    assert {"model", "method", "protocol", "metrics", "machine", "versions", "date", "command"} <= set(record)
    ppl_row = record["metrics"]["rows"][0]
    assert ppl_row["details"]["windows"] == 2 and ppl_row["details"]["seqlen"] == 64
    assert "GPTQ" in ppl_row["details"]["protocol"]
    assert record["metrics"]["rows"][1]["value"] == pytest.approx(0.0, abs=1e-6)  # KL from itself


def test_info_and_bench(tiny_dir, capsys):
    assert main(["info", "--model", tiny_dir, "--context", "128"]) == 0
    printed = capsys.readouterr().out
    assert "| parameters |" in printed and "| flops_per_token_decode |" in printed
    assert main(["bench", "--model", tiny_dir, "--prompt-tokens", "8", "--new-tokens", "3", "--batch", "1,2",
                 "--repeats", "1", "--peak-flops", "1e10"]) == 0
    printed = capsys.readouterr().out
    assert "decode_tokens_per_s" in printed and printed.count("\n| ") >= 2


def test_zero_shot_rows_follow_lm_eval_metrics(tiny_dir, data_dir, capsys):
    assert main(["eval", "--model", tiny_dir, "--tasks", "boolq,piqa,lambada", "--limit", "3",
                 "--data-dir", str(data_dir)]) == 0
    printed = capsys.readouterr().out
    assert "| boolq | acc |" in printed and "| boolq | acc_norm |" not in printed
    assert "| piqa | acc |" in printed and "| piqa | acc_norm |" in printed
    assert "| lambada | ppl |" in printed and "| lambada | acc |" in printed
