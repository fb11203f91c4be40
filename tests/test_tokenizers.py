"""Tokenizers beside the byte tokenizer: a Hugging Face tokenizer.json gives the ids, text and
chat prompts transformers gave for the same folder, and a corpus read with it feeds training."""

from __future__ import annotations

import json

import numpy as np
import pytest
from recipe_runs import ROOT

from mlsys_jax.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, encode_prompt, load_tokenizer, render_chat
from mlsys_jax.train import data

FIXTURES = ROOT / "tests" / "fixtures" / "hf"
REFERENCE = json.loads((FIXTURES / "tokenizer_reference.json").read_text())


@pytest.mark.parametrize("folder", ["llama3", "qwen2"])
def test_ids_and_text_match_transformers(folder):
    tok = load_tokenizer(str(FIXTURES / folder))
    ref = REFERENCE[folder]
    assert tok.vocab_size == ref["vocab_size"]
    assert isinstance(tok, HFTokenizer) and tok.EOS == ref["special_tokens"][ref["eos_token"]]
    for case in ref["strings"]:
        assert tok.encode(case["text"]).tolist() == case["ids"], case["text"]
        assert tok.decode(case["ids"]) == case["decoded"]


@pytest.mark.parametrize("folder", ["llama3", "qwen2"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_the_chat_template_renders_as_transformers_does(folder, generation_prompt):
    tok = load_tokenizer(str(FIXTURES / folder))
    ref = REFERENCE[folder]
    expected = next(c for c in ref["chat"] if c["add_generation_prompt"] == generation_prompt)
    text = render_chat(tok, ref["messages"], add_generation_prompt=generation_prompt)
    assert text == expected["text"]
    assert tok.encode(text).tolist() == expected["ids"]


def test_the_byte_tokenizer_has_a_plain_chat_format():
    text = render_chat(ByteTokenizer(), [{"role": "user", "content": "hi"}])
    assert text == "user: hi\nassistant: "


def test_a_template_that_raises_is_one_message(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((FIXTURES / "llama3" / "tokenizer.json").read_bytes())
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with the user') }}{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>", "chat_template": template}))
    with pytest.raises(TokenizerError, match="refused: Conversations must start with the user"):
        render_chat(load_tokenizer(str(tmp_path)), [{"role": "system", "content": "x"}])


def test_a_folder_without_tokenizer_json_is_named(tmp_path):
    with pytest.raises(TokenizerError, match="has no tokenizer.json. Fix: .*--tokenizer byte"):
        load_tokenizer(str(tmp_path))


def test_a_corpus_read_with_it_joins_documents_with_its_eos(tmp_path):
    (tmp_path / "a.txt").write_text("The fox and the dog are friends. " * 20)
    (tmp_path / "b.txt").write_text("A naïve café in 日本. " * 20)
    tok = load_tokenizer(str(FIXTURES / "llama3"))
    corpus = data.load_corpus([tmp_path], tokenizer=tok)
    stream = np.concatenate([corpus.train, corpus.val])
    assert stream.max() < tok.vocab_size and int((stream == tok.EOS).sum()) == 2
    assert "naïve café" in tok.decode(stream)


def test_a_completion_prompt_gets_the_special_tokens_its_tokenizer_adds(tmp_path):
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(FIXTURES / "llama3" / "tokenizer.json"))
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_bytes((FIXTURES / "llama3" / "tokenizer_config.json").read_bytes())
    with_bos = load_tokenizer(str(tmp_path))
    assert encode_prompt(with_bos, "Hello").tolist() == [bos, *with_bos.encode("Hello").tolist()]
    assert encode_prompt(ByteTokenizer(), "Hi").tolist() == [72, 105]
