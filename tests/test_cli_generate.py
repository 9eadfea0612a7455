"""`slimlm generate`: streamed text, batches, caches, speculative decoding, one-line errors."""

import json

import pytest

from slimlm.cli import main
from slimlm.infer import generate
from slimlm.models.tiny import tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tokenizer):
    """A tiny Qwen2 with the real tokenizer, and a draft whose tokenizer has one extra token."""
    target = tmp_path_factory.mktemp("tiny-target")
    model = tiny_model("qwen2", vocab_size=len(tokenizer))
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    other = tmp_path_factory.mktemp("tiny-other-tokenizer")
    model.save_pretrained(other)
    changed = type(tokenizer).from_pretrained(target)
    changed.add_tokens(["<not-in-the-target>"])
    changed.save_pretrained(other)
    return str(target), str(other), model


def test_generate_streams_the_greedy_continuation(tiny_dirs, tokenizer, capsys):
    target, _, model = tiny_dirs
    assert main(["generate", "--model", target, "--prompt", "The cat", "--max-new-tokens", "6", "--no-stop"]) == 0
    printed = capsys.readouterr().out
    expected = generate(model, tokenizer, "The cat", 6, stop_at_eos=False).texts[0]
    assert printed.startswith("The cat" + expected + "\n")
    assert "| tokens_per_s |" in printed and "| kv_bytes_wasted |" in printed


def test_batch_paged_and_json_record(tiny_dirs, tmp_path, capsys):
    target, _, _ = tiny_dirs
    out = tmp_path / "generation.json"
    assert main(["generate", "--model", target, "--prompt", "Hi", "--prompt", "A much longer prompt than that",
                 "--max-new-tokens", "5", "--cache", "paged", "--block-size", "4", "--no-stop",
                 "--temperature", "0.8", "--top-p", "0.9", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[0] Hi" in printed and "[1] A much longer prompt than that" in printed
    record = json.loads(out.read_text())
    assert record["metrics"]["stats"]["new_tokens"] == [5, 5] and record["protocol"]["cache"]["kind"] == "paged"
    assert record["metrics"]["stats"]["kv_bytes_wasted"] < 2 * 4 * record["metrics"]["stats"]["kv_bytes_per_token"]


def test_speculative_and_sink_window_generation(tiny_dirs, capsys):
    target, _, _ = tiny_dirs
    assert main(["generate", "--model", target, "--draft", target, "--gamma", "3", "--prompt", "Once",
                 "--max-new-tokens", "8", "--no-stop"]) == 0
    printed = capsys.readouterr().out
    assert "| acceptance_rate | 1.0000 |" in printed and "| tokens_per_target_forward | 4.0000 |" in printed
    assert main(["generate", "--model", target, "--prompt", "Once upon", "--sink-tokens", "2", "--window", "6",
                 "--max-new-tokens", "20", "--no-stop"]) == 0
    assert "| cache | sinks |" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--prompt", ""], "prompt 0 is empty"),
    (["--prompt", "x", "--max-new-tokens", "-1"], "max_new_tokens must be an integer >= 0"),
    (["--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt", "x", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["--prompt", "x", "--draft", "other", "--gamma", "0"], "gamma (draft tokens per step) must be an integer >= 1"),
    (["--prompt", "x", "--window", "0"], "window must be at least 1"),
    (["--prompt", "x", "--sink-tokens", "-2"], "sink tokens must be >= 0"),
    (["--prompt", "x", "--cache", "paged", "--window", "8"], "apply to the sinks cache"),
    (["--prompt", "x", "--draft", "other", "--window", "8"], "roll back"),
    (["--prompt", "x", "--draft", "other", "--gamma", "20", "--adaptive-gamma"], "must be >= gamma (20)"),
])
def test_bad_arguments_fail_before_loading(extra, message, capsys):
    assert main(["generate", "--model", "never-loaded", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimlm: error:") and message in err and "Traceback" not in err


def test_draft_with_another_tokenizer_is_refused(tiny_dirs, capsys):
    target, other, _ = tiny_dirs
    assert main(["generate", "--model", target, "--draft", other, "--prompt", "x", "--max-new-tokens", "3"]) == 2
    assert "tokenizer differs" in capsys.readouterr().err


def test_unsupported_architecture_is_a_one_line_error(tmp_path, tokenizer, capsys):
    tiny_model("falcon", vocab_size=len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    assert "supports llama, mistral, qwen2" in capsys.readouterr().err
