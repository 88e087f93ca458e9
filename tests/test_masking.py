"""Response-only masking per template, multi-turn, from the template's structure."""

import pytest

from distill.data.encoding import (
    IGNORE_INDEX,
    NoTrainableTokensError,
    encode_all,
    encode_record,
    show_labels,
    truncate,
)
from distill.data.formats import to_record
from distill.data.templates import TemplateError, check_stops_on_end_of_turn, resolve_template

MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is Python?"},
        {"role": "assistant", "content": "A programming language."},
        {"role": "user", "content": "Who made it?"},
        {"role": "assistant", "content": "Guido van Rossum, in 1991."},
    ]
}


def trained_text(sample, tok) -> list[str]:
    """Decode each maximal run of trainable labels."""
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tok.decode(current)), current.clear()
    if current:
        runs.append(tok.decode(current))
    return runs


@pytest.mark.parametrize("name", ["chatml", "llama3", "alpaca", "mistral"])
def test_only_assistant_turns_and_their_end_of_turn_are_trained(chat_tokenizer, name):
    template = resolve_template(chat_tokenizer, name)
    sample = encode_record(to_record(MULTI_TURN, "t:1"), chat_tokenizer, template)
    runs = [run.strip() for run in trained_text(sample, chat_tokenizer)]
    eot = template.end_of_turn
    assert runs == [f"A programming language.{eot}", f"Guido van Rossum, in 1991.{eot}"]
    # labels equal the input ids where kept
    assert all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(sample.input_ids, sample.labels, strict=True))


def test_tokenizers_own_template_is_used_and_its_end_of_turn_detected(tmp_path, chat_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    from distill.data.templates import BUILTIN_TEMPLATES

    tok.chat_template = BUILTIN_TEMPLATES["chatml"][0]
    template = resolve_template(tok)
    assert template.name == "tokenizer" and template.end_of_turn == "<|im_end|>"
    sample = encode_record(to_record(MULTI_TURN, "t:1"), tok, template)
    assert [r.strip() for r in trained_text(sample, tok)][1] == "Guido van Rossum, in 1991.<|im_end|>"


def test_masking_off_trains_on_everything(chat_tokenizer):
    template = resolve_template(chat_tokenizer, "chatml")
    sample = encode_record(
        to_record(MULTI_TURN, "t:1"), chat_tokenizer, template, train_on_responses_only=False
    )
    assert sample.labels == sample.input_ids


def test_unknown_template_name(chat_tokenizer):
    with pytest.raises(TemplateError, match="unknown chat template 'vicuna'"):
        resolve_template(chat_tokenizer, "vicuna")


def test_missing_template_is_explained(tokenizer):
    with pytest.raises(TemplateError, match="no chat_template"):
        resolve_template(tokenizer, None)


def test_end_of_turn_must_be_a_stop_token(chat_tokenizer):
    chatml = resolve_template(chat_tokenizer, "chatml")
    with pytest.raises(TemplateError, match="never stop"):
        check_stops_on_end_of_turn(chat_tokenizer, chatml)
    eot_id = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eot_id in check_stops_on_end_of_turn(chat_tokenizer, chatml, stop_tokens=["<|im_end|>"])
    assert eot_id in check_stops_on_end_of_turn(chat_tokenizer, chatml, add_to_stop_tokens=True)
    # templates ending turns with EOS pass as they are
    assert check_stops_on_end_of_turn(chat_tokenizer, resolve_template(chat_tokenizer, "mistral")) == [
        chat_tokenizer.eos_token_id
    ]


def test_end_of_turn_that_is_not_one_token(tokenizer):
    with pytest.raises(TemplateError, match="not one token"):
        check_stops_on_end_of_turn(tokenizer, resolve_template(tokenizer, "chatml"))


def test_truncation_policies(tokenizer):
    template = resolve_template(tokenizer, "mistral")
    sample = encode_record(to_record(MULTI_TURN, "t:1"), tokenizer, template)
    n = len(sample.input_ids)
    assert truncate(sample, n, "right") is sample
    right, left = truncate(sample, 10, "right"), truncate(sample, 10, "left")
    assert right.input_ids == sample.input_ids[:10] and left.input_ids == sample.input_ids[-10:]
    assert truncate(sample, 10, "drop") is None


def test_counts_and_dropped_samples(tokenizer):
    template = resolve_template(tokenizer, "mistral")
    long_prompt = {
        "messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    }
    records = [to_record(MULTI_TURN, "t:1"), to_record(long_prompt, "t:2")]
    kept, stats = encode_all(records, tokenizer, template, max_length=64, truncation="right")
    # the long prompt loses its answer to truncation: dropped and counted, not a crash
    assert [s.source for s in kept] == ["t:1"]
    assert (stats.samples, stats.kept, stats.truncated, stats.dropped_no_trainable) == (2, 1, 1, 1)
    assert 0 < stats.trainable_share < 1
    _, stats = encode_all(records, tokenizer, template, max_length=64, truncation="drop")
    assert stats.dropped_too_long == 1 and stats.too_long == ["t:2"]  # named in the warning


def test_all_labels_masked_stops_with_a_decoded_sample(tokenizer):
    template = resolve_template(tokenizer, "mistral")
    records = [to_record(MULTI_TURN, "t:1")]
    with pytest.raises(NoTrainableTokensError, match=r"(?s)every label masked.*t:1.*\[<s>\[INST\]"):
        encode_all(records, tokenizer, template, max_length=8)


def test_show_labels_brackets_masked_runs(tokenizer):
    template = resolve_template(tokenizer, "mistral")
    sample = encode_record(to_record(MULTI_TURN, "t:1"), tokenizer, template)
    shown = show_labels(sample, tokenizer)
    assert shown.startswith("[<s>[INST]") and "A programming language.</s>[" in shown
    assert shown.endswith("Guido van Rossum, in 1991.</s>")
