"""dataset → sequences: the three example shapes, label masking, truncation, packing, caps, bad rows."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from geocache.data import BadRowError, DataConfig, data_fingerprint, iter_sequences, load_examples, tokenize_example

IGNORE = -100


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def labelled_text(tok, ids, labels):
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])


def test_text_rows_are_all_labels_and_end_with_eos(tok):
    ids, labels = tokenize_example({"text": "def f(x):\n    return x"}, 0, tok, DataConfig())
    assert labels == ids and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:-1]) == "def f(x):\n    return x"


def test_prompt_completion_takes_loss_on_the_completion_only(tok):
    ids, labels = tokenize_example({"prompt": "Question: why?", "completion": " Because."}, 0, tok, DataConfig())
    assert tok.decode(ids) == "Question: why? Because.<|endoftext|>"
    assert labelled_text(tok, ids, labels) == " Because.<|endoftext|>"
    assert labels[0] == IGNORE


def test_chat_takes_loss_on_assistant_turns_only(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "return x"},
    ]
    ids, labels = tokenize_example({"messages": messages}, 0, tok, DataConfig())
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
    # Both assistant contents and their end-of-turn markers; no role header, no user or system text.
    assert labelled_text(tok, ids, labels) == "hello there<|im_end|>\nreturn x<|im_end|>\n"


def test_conversational_prompt_completion_rows_take_loss_on_the_completion_only(tok, tokenizer_dir):
    """TRL's conversational prompt-completion rows (prompt and completion both lists of messages):
    the loss on what the completion adds after the prompt's generation prompt, never on an
    assistant turn of the prompt's history. Was "field 'prompt' must be a string, got list"."""
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "more"}]
    completion = [{"role": "assistant", "content": "return x"}]
    ids, labels = tokenize_example({"prompt": prompt, "completion": completion}, 0, tok, DataConfig())
    text = tok.apply_chat_template(prompt + completion, tokenize=False)
    assert tok.decode(ids) == text
    asking = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert labelled_text(tok, ids, labels) == text[len(asking):] == "return x<|im_end|>\n"  # TRL's completion mask
    # the same row as plain messages labels the history's assistant turn too
    _, all_labels = tokenize_example({"messages": prompt + completion}, 0, tok, DataConfig())
    assert "hello there" in labelled_text(tok, ids, all_labels)
    # a template that renders the history differently once a turn follows (Qwen3's think blocks): the
    # prompt's assistant turn stays unlabelled, the completion is what follows the generation prompt
    think = AutoTokenizer.from_pretrained(tokenizer_dir)
    think.chat_template = THINK_AFTER_LAST_USER
    ids, labels = tokenize_example({"prompt": prompt, "completion": completion}, 0, think, DataConfig())
    text = think.apply_chat_template(prompt + completion, tokenize=False)
    asking = think.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert labelled_text(think, ids, labels) == text[len(asking):] == "<think>\n\n</think>\n\nreturn x<|im_end|>\n"
    with pytest.raises(BadRowError, match=r"row 3: fields 'prompt' and 'completion' must be both text or both lists of messages"):
        tokenize_example({"prompt": "hi", "completion": completion}, 3, tok, DataConfig())
    with pytest.raises(BadRowError, match=r"row 4: no non-empty assistant turn to learn from in its completion"):
        tokenize_example({"prompt": prompt, "completion": [{"role": "user", "content": "x"}]}, 4, tok, DataConfig())
    with pytest.raises(BadRowError, match=r"row 5: field 'completion' is an empty list of messages"):
        tokenize_example({"prompt": prompt, "completion": []}, 5, tok, DataConfig())


# A template that renders an assistant turn differently once a later user turn follows, as
# Qwen3's does (an empty think block only on the turns after the last user message).
THINK_AFTER_LAST_USER = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_user %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{{ m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_chat_templates_that_rewrite_earlier_turns_label_each_assistant_content(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = THINK_AFTER_LAST_USER
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "say hello there again"},  # holds the first answer's text: found after it
        {"role": "assistant", "content": "return x"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert not text.startswith(tok.apply_chat_template(messages[:2], tokenize=False))  # not prefix by prefix
    ids, labels = tokenize_example({"messages": messages}, 0, tok, DataConfig())
    assert tok.decode(ids) == text
    assert labelled_text(tok, ids, labels) == "hello there<|im_end|>\nreturn x<|im_end|>\n"
    # the labels sit on the assistant turns themselves, not on the user's quote of the first one
    first = [i for i, lab in enumerate(labels) if lab != IGNORE][0]
    assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")


def test_a_template_that_drops_earlier_reasoning_labels_what_it_renders_of_those_turns(tokenizer_dir):
    """Qwen3's template keeps only the answer after </think> of the assistant turns before the last
    user message: multi-turn reasoning data was a bad row ("message 1 (assistant) is not in the
    chat template's rendering")."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = THINK_AFTER_LAST_USER.replace("{{ m.content + '<|im_end|>\\n' }}",
                                                      "{{ (m.content.split('</think>')[-1].lstrip('\\n') if loop.index0 < ns.last_user "
                                                      "else m.content) + '<|im_end|>\\n' }}")
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>\nthey greet\n</think>\n\nhello there"},
        {"role": "user", "content": "and now?"},
        {"role": "assistant", "content": "<think>\nagain\n</think>\n\nreturn x"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert "they greet" not in text and "again" in text  # the premise: the earlier reasoning is gone
    ids, labels = tokenize_example({"messages": messages}, 0, tok, DataConfig())
    assert tok.decode(ids) == text
    assert labelled_text(tok, ids, labels) == "hello there<|im_end|>\n<think>\nagain\n</think>\n\nreturn x<|im_end|>\n"


def test_a_template_without_a_generation_prompt_leaves_the_role_header_unlabelled(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"  # no add_generation_prompt branch
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "more"}, {"role": "assistant", "content": "sure"}]
    ids, labels = tokenize_example({"messages": messages}, 0, tok, DataConfig())
    assert tok.decode(ids) == "user: hi\nassistant: yo\nuser: more\nassistant: sure\n"
    labelled = labelled_text(tok, ids, labels)  # was 'assistant: yo\nassistant: sure\n'
    assert "assistant" not in labelled and ":" not in labelled and labelled.replace(" ", "") == "yo\nsure\n", labelled


def test_a_conversation_that_opens_with_an_assistant_turn_is_labelled_by_content(tok):
    messages = [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "bye"}]
    ids, labels = tokenize_example({"messages": messages}, 0, tok, DataConfig())  # raised transformers' "empty conversation"
    assert labelled_text(tok, ids, labels).replace(" ", "") == "hello<|im_end|>\nbye<|im_end|>\n"


def test_a_conversation_the_chat_template_refuses_is_a_bad_row_named_and_skippable(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                         "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}]}
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(BadRowError, match=r"row 4: the chat template refuses this conversation \(Conversation roles must alternate"):
        tokenize_example(bad, 4, tok, DataConfig())
    skipped = []
    seqs = list(iter_sequences([good, bad, good], tok, DataConfig(skip_bad_rows=True), bad_rows=skipped))
    assert len(seqs) == 2 and len(skipped) == 1 and skipped[0].startswith("row 1:")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }"  # broken: the template, not the row
    with pytest.raises(ValueError, match="the tokenizer's chat template does not compile"):
        tokenize_example(good, 0, tok, DataConfig())


# A template of our own in the transformers tool-use form: ``tools`` in a system preamble, an
# assistant turn's ``tool_calls`` rendered after its (possibly null) content, ``tool`` results as turns.
TOOL_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\nTools: ' }}{{ tools | map(attribute='function') | map(attribute='name') | join(', ') }}"
    "{{ '<|im_end|>\n' }}{%- endif %}"
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}{%- if m.content %}{{ m.content }}{%- endif %}"
    "{%- for c in m.tool_calls or [] %}{{ '<tool_call>' + c.function.name + ' ' + (c.function.arguments | tojson) + '</tool_call>' }}{%- endfor %}"
    "{{ '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def test_tool_calling_conversations_label_the_calls_and_answers_not_the_tool_results(tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = TOOL_TEMPLATE
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "name": "get_weather", "content": "sunny, 21C"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    row = {"messages": messages, "tools": [WEATHER]}
    ids, labels = tokenize_example(row, 0, tok, DataConfig())  # was "message 1 must have string 'role' and 'content'"
    text = tok.apply_chat_template(messages, tools=[WEATHER], tokenize=False)
    assert text.startswith("<|im_start|>system\nTools: get_weather<|im_end|>\n")  # the tools reached the template
    assert tok.decode(ids) == text
    labelled = labelled_text(tok, ids, labels)
    assert labelled.replace(" ", "") == '<tool_call>get_weather{"city":"Paris"}</tool_call><|im_end|>\nItissunny.<|im_end|>\n', labelled
    assert "sunny, 21C" not in labelled and "Tools" not in labelled
    assert row["messages"][1]["content"] is None  # the caller's row is left as it was
    # the same row from a JSON array file, where datasets streams mixed-type messages as JSON strings
    (tmp_path / "tools.json").write_text(json.dumps([row, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]))
    [(ids2, labels2), _] = [(s.input_ids, s.labels) for s in iter_sequences(load_examples(str(tmp_path / "tools.json")), tok, DataConfig())]
    assert (ids2, labels2) == (ids, labels)


def test_tool_schemas_and_call_arguments_reach_the_template_as_written_from_every_file_format(tokenizer_dir, tmp_path):
    """Rows whose tools (and calls) differ in shape: datasets' streamed JSON reader gave one tool's
    ``properties`` as a JSON string, and Parquet's one schema gave every tool every other tool's
    parameters as None ("city": null), both rendered into the cached prompt."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = "{{ tools | tojson }}" + TOOL_TEMPLATE  # the schemas rendered, as real templates do
    search = {"type": "function", "function": {"name": "search", "description": "Search.",
                                               "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "n": {"type": "integer"}}}}}
    rows = [
        {"messages": [{"role": "user", "content": "Paris?"},
                      {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                      {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}], "tools": [WEATHER]},
        {"messages": [{"role": "user", "content": "Find x"},
                      {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"query": "x", "n": 2}}}]},
                      {"role": "tool", "content": "found"}, {"role": "assistant", "content": "Found."}], "tools": [search]},
    ]
    want = [tokenize_example(r, i, tok, DataConfig()) for i, r in enumerate(rows)]
    assert '"city": null' not in tok.decode(want[1][0]) and '"query"' in tok.decode(want[1][0])
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))  # JSON Lines in a .json file
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert pq.read_table(tmp_path / "d.parquet").to_pylist()[1]["tools"][0]["function"]["parameters"]["properties"]["city"] is None  # the premise
    for name, split in [("d.json", "train"), ("lines.json", "train"), ("d.parquet", "train"), ("d.json", "train[:100%]"), ("d.parquet", "train[:100%]")]:
        got = [(s.input_ids, s.labels) for s in iter_sequences(load_examples(str(tmp_path / name), split=split), tok, DataConfig())]
        assert got == want, (name, split)
    # a .json file read as written still names a bad line, and a bad array element
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "lines.json").write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(BadRowError, match=r"row 1: line 2 of .*lines.json is not valid JSON"):
        list(iter_sequences(load_examples(str(tmp_path / "bad" / "lines.json")), tok, DataConfig()))
    (tmp_path / "bad" / "lines.json").write_text(json.dumps([rows[0], 7]))
    with pytest.raises(BadRowError, match=r"row 1: element 1 of .*lines.json holds a int, not an object"):
        list(iter_sequences(load_examples(str(tmp_path / "bad" / "lines.json")), tok, DataConfig()))


def test_tool_calls_the_template_cannot_place_or_render_are_bad_rows(tokenizer_dir, tok):
    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}
    # the default ChatML test template concatenates the null content
    with pytest.raises(BadRowError, match=r"row 3: the chat template cannot render this conversation"):
        tokenize_example({"messages": [{"role": "user", "content": "a"}, call]}, 3, tok, DataConfig())
    # labels placed by content (a conversation opening with an assistant turn): the rendered calls have none to find
    tool_tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tool_tok.chat_template = TOOL_TEMPLATE
    with pytest.raises(BadRowError, match=r"row 3: message 0 \(assistant\) calls tools"):
        tokenize_example({"messages": [call, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 3, tool_tok, DataConfig())
    with pytest.raises(BadRowError, match=r"row 3: field 'tools' must be a list"):
        tokenize_example({"messages": [{"role": "user", "content": "a"}, call], "tools": 5}, 3, tool_tok, DataConfig())
    with pytest.raises(BadRowError, match=r"row 3: message 1 must have string 'role' and 'content' \(or, for an assistant turn"):
        tokenize_example({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": []}]}, 3, tool_tok, DataConfig())


@pytest.mark.parametrize(
    "row,message",
    [
        ({"txt": "a"}, r"row 7: missing field 'text'"),
        ({"text": 3}, r"row 7: field 'text' must be a string, got int"),
        ({"text": "   "}, r"row 7: field 'text' is empty"),
        ({"prompt": "a", "completion": ""}, r"row 7: field 'completion' is empty"),
        ({"messages": []}, r"row 7: field 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": "x"}]}, r"row 7: no non-empty assistant turn"),
        ({"messages": [{"role": "user"}]}, r"row 7: message 0 must have string 'role' and 'content'"),
    ],
)
def test_malformed_rows_name_their_row(tok, row, message):
    with pytest.raises(BadRowError, match=message):
        tokenize_example(row, 7, tok, DataConfig())


def test_skip_bad_rows_counts_and_skips(tok):
    rows = [{"text": "one"}, {"text": ""}, {"text": 5}, {"text": "four"}]
    with pytest.raises(BadRowError, match="row 1"):
        list(iter_sequences(rows, tok, DataConfig()))
    bad = []
    seqs = list(iter_sequences(rows, tok, DataConfig(skip_bad_rows=True), bad))
    assert len(seqs) == 2 and len(bad) == 2 and bad[0].startswith("row 1:")


def test_truncation_caps_and_determinism(tok):
    rows = [{"text": "word " * 50}] * 10
    seqs = list(iter_sequences(rows, tok, DataConfig(max_length=16)))
    assert len(seqs) == 10 and all(len(s) == 16 for s in seqs)
    assert len(list(iter_sequences(rows, tok, DataConfig(max_length=16, max_sequences=3)))) == 3
    assert len(list(iter_sequences(rows, tok, DataConfig(max_length=16, max_tokens=40)))) == 3
    again = list(iter_sequences(rows, tok, DataConfig(max_length=16)))
    assert [s.input_ids for s in again] == [s.input_ids for s in seqs]


def test_packing_never_crosses_example_boundaries(tok):
    rows = [{"text": f"example number {i} " + "x " * i} for i in range(12)]
    cfg = DataConfig(max_length=40, packing=True)
    seqs = list(iter_sequences(rows, tok, cfg))
    singles = [tokenize_example(r, i, tok, cfg)[0] for i, r in enumerate(rows)]
    assert sum(len(s.segments) for s in seqs) == len(rows)
    assert [t for s in seqs for t in s.input_ids] == [t for ids in singles for t in ids]
    for s in seqs:
        assert len(s) <= 40 and len(s.segments) >= 1
        for a, b in s.segments:
            assert s.position_ids[a:b] == list(range(b - a))  # positions restart per example
            if a > 0:
                assert s.labels[a] == IGNORE  # never predicted from the previous example
    assert max(len(s.segments) for s in seqs) > 1


def test_load_examples_from_each_local_format_and_directories(tmp_path, monkeypatch):
    rows = [{"text": "alpha"}, {"text": "beta"}]
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "j" / "b.jsonl").write_text(json.dumps({"text": "gamma"}))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("text\nalpha\nbeta\n")
    (tmp_path / "d.txt").write_text("alpha\nbeta\n")
    assert [r["text"] for r in load_examples(str(tmp_path / "j"))] == ["alpha", "beta", "gamma"]
    for name in ("d.parquet", "d.csv", "d.txt"):
        assert [r["text"] for r in load_examples(str(tmp_path / name))] == ["alpha", "beta"]
    fp = data_fingerprint(str(tmp_path / "j"))
    (tmp_path / "j" / "b.jsonl").write_text(json.dumps({"text": "delta"}))
    assert data_fingerprint(str(tmp_path / "j"))["sha256"] != fp["sha256"]
    # The digest is of the bytes (read in 1 MiB chunks, never whole): a file over one chunk, changed
    # past its first chunk, changes it, and it equals hashlib's over the same name and bytes.
    import hashlib

    big = tmp_path / "big" / "x.jsonl"
    big.parent.mkdir()
    body = (json.dumps({"text": "x" * 1000}) + "\n") * 3000
    big.write_text(body)
    want = hashlib.sha256(b"x.jsonl" + hashlib.sha256(body.encode()).digest()).hexdigest()
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} was read whole"))
    assert data_fingerprint(str(big))["sha256"] == want
    big.write_text(body[:-3] + 'y"}\n')
    assert data_fingerprint(str(big))["sha256"] != want


def test_text_files_give_lines_paragraphs_or_documents_and_skip_blank_lines(tmp_path):
    (tmp_path / "d.txt").write_text("First paragraph, line one\ncontinues here.\n\nSecond paragraph.\n")
    lines = [r["text"] for r in load_examples(str(tmp_path / "d.txt"))]
    assert lines == ["First paragraph, line one", "continues here.", "Second paragraph."]  # the blank line is no bad row
    paragraphs = [r["text"].strip() for r in load_examples(str(tmp_path / "d.txt"), text_sample_by="paragraph")]
    assert paragraphs == ["First paragraph, line one\ncontinues here.", "Second paragraph."]
    documents = [r["text"] for r in load_examples(str(tmp_path / "d.txt"), text_sample_by="document")]
    assert len(documents) == 1 and "continues here.\n\nSecond" in documents[0]
    with pytest.raises(ValueError, match="text_sample_by='page' must be one of line, paragraph, document"):
        DataConfig(text_sample_by="page")


def test_a_hub_dataset_is_pinned_to_the_commit_its_revision_resolves_to(monkeypatch):
    import datasets
    import huggingface_hub

    class Info:
        sha = "c0ffee"

    asked = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, repo_id, revision=None: asked.update(info=(repo_id, revision)) or Info())
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: asked.update(load=(a, kw)) or [{"text": "x"}])
    fp = data_fingerprint("org/corpus", "main")
    assert fp == {"kind": "hub", "id": "org/corpus", "revision": "main", "commit": "c0ffee"} and asked["info"] == ("org/corpus", "main")
    load_examples("org/corpus", revision=fp["commit"])
    assert asked["load"][0] == ("org/corpus",) and asked["load"][1]["revision"] == "c0ffee"


def test_missing_and_mixed_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="do not exist"):
        load_examples(str(tmp_path / "missing.jsonl"))
    (tmp_path / "a.jsonl").write_text("{}")
    (tmp_path / "b.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match="share a format"):
        load_examples(str(tmp_path))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds only empty files"):
        load_examples(str(tmp_path / "empty" / "e.jsonl"))
    (tmp_path / "empty" / "f.jsonl").write_text('{"text": "x"}\n')  # an empty file beside others is skipped
    assert [r["text"] for r in load_examples(str(tmp_path / "empty"))] == ["x"]


def test_an_unreachable_hub_dataset_is_one_sentence():
    with pytest.raises(FileNotFoundError, match="'nobody/no-such-dataset' is neither a local path nor a loadable hub dataset"):
        load_examples("nobody/no-such-dataset")


def test_local_data_reads_the_train_split_or_a_slice_of_it(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(5)))
    assert [r["text"] for r in load_examples(str(tmp_path / "d.jsonl"), split="train[:2]")] == ["row 0", "row 1"]
    assert [r["text"] for r in load_examples(str(tmp_path / "d.jsonl"), split="train[60%:]")] == ["row 3", "row 4"]
    with pytest.raises(ValueError, match=r"split='test': local data files form one split, 'train' \(or a slice of it"):
        load_examples(str(tmp_path / "d.jsonl"), split="test")


def test_a_hub_dataset_subset_and_slice_reach_datasets(monkeypatch):
    """A slice by row numbers streams (skip, take: nothing past it is read, nothing downloaded
    whole); a slice in percent needs the split's length, so datasets loads it non-streaming."""
    import datasets

    class Stream(list):
        def skip(self, n):
            asked["skip"] = n
            return Stream(self[n:])

        def take(self, n):
            asked["take"] = n
            return Stream(self[:n])

    asked = {}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: asked.update(a=a, kw=kw) or Stream({"text": str(i)} for i in range(50)))
    rows = load_examples("allenai/c4", split="validation[5:15]", subset="en")
    assert asked["a"] == ("allenai/c4",) and asked["kw"]["name"] == "en"  # the subset is datasets' configuration name
    assert asked["kw"]["split"] == "validation" and asked["kw"]["streaming"] is True
    assert (asked["skip"], asked["take"]) == (5, 10) and [r["text"] for r in rows] == [str(i) for i in range(5, 15)]
    asked.clear()
    load_examples("allenai/c4", split="validation[:10%]", subset="en")
    assert asked["kw"]["split"] == "validation[:10%]" and asked["kw"]["streaming"] is False and "take" not in asked
    load_examples("allenai/c4", subset="en")
    assert asked["kw"]["split"] == "train" and asked["kw"]["streaming"] is True
    with pytest.raises(ValueError, match=r"split='train\[9:3\]' is an empty slice"):
        load_examples("allenai/c4", split="train[9:3]")


def test_csv_columns_are_text_even_when_they_look_numeric(tmp_path, tok):
    (tmp_path / "qa.csv").write_text('prompt,completion\n"What is 6 x 7?",42\n"And 1 + 1?",2\n')
    rows = list(load_examples(str(tmp_path / "qa.csv")))
    assert rows == [{"prompt": "What is 6 x 7?", "completion": "42"}, {"prompt": "And 1 + 1?", "completion": "2"}]
    ids, labels = tokenize_example(rows[0], 0, tok, DataConfig())
    assert labelled_text(tok, ids, labels) == "42" + tok.eos_token
    # a JSON number where text belongs is still a wrong type
    with pytest.raises(BadRowError, match="row 3: field 'completion' must be a string, got int"):
        tokenize_example({"prompt": "q", "completion": 42}, 3, tok, DataConfig())
    # Cells pandas would call missing are text too; an empty one is an empty field, as in JSONL.
    words = ["NA", "null", "nan", "N/A", "None", "#N/A", "-NaN"]
    (tmp_path / "na.csv").write_text("text\n" + "\n".join(words) + "\n")
    assert list(load_examples(str(tmp_path / "na.csv"))) == [{"text": w} for w in words]
    (tmp_path / "empty.csv").write_text('prompt,completion\nQ?,\n')
    row = next(iter(load_examples(str(tmp_path / "empty.csv"))))
    with pytest.raises(BadRowError, match="row 0: field 'completion' is empty"):  # (was "missing field 'completion'", naming it)
        tokenize_example(row, 0, tok, DataConfig())


@pytest.fixture(scope="module")
def bos_tok(tokenizer_dir, tmp_path_factory):
    """The test tokenizer with a Llama-style post-processor: BOS before every text."""
    from tokenizers import processors

    t = AutoTokenizer.from_pretrained(tokenizer_dir)
    t.add_special_tokens({"bos_token": "<s>"})
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", t.bos_token_id)])
    path = tmp_path_factory.mktemp("bos_tok")
    t.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def test_text_and_prompts_start_with_the_tokenizers_bos_which_is_never_a_label(bos_tok, tok):
    from geocache.data import text_prefix

    assert text_prefix(bos_tok) == [bos_tok.bos_token_id] and text_prefix(tok) == []
    ids, labels = tokenize_example({"text": "def f(x):"}, 0, bos_tok, DataConfig())
    assert ids[0] == bos_tok.bos_token_id and ids[1:-1] == bos_tok("def f(x):", add_special_tokens=False)["input_ids"]
    assert labels[0] == IGNORE and labels[1:] == ids[1:]
    ids, labels = tokenize_example({"prompt": "Q?", "completion": " A."}, 0, bos_tok, DataConfig())
    assert ids[0] == bos_tok.bos_token_id and labelled_text(bos_tok, ids, labels) == " A." + bos_tok.eos_token
    plain, _ = tokenize_example({"text": "def f(x):"}, 0, bos_tok, DataConfig(add_bos=False))
    assert plain == ids_without_bos(bos_tok, "def f(x):")
    # packed: every example keeps its BOS, and no label crosses into the next example
    seqs = list(iter_sequences([{"text": "a b"}, {"text": "c d"}], bos_tok, DataConfig(packing=True, max_length=64)))
    (seq,) = seqs
    assert [seq.input_ids[a] for a, _ in seq.segments] == [bos_tok.bos_token_id] * 2
    assert all(seq.labels[a] == IGNORE for a, _ in seq.segments)


def ids_without_bos(t, text):
    return t(text, add_special_tokens=False)["input_ids"] + [t.eos_token_id]


def test_rows_left_with_nothing_to_learn_are_counted(tok):
    rows = [{"prompt": "x " * 40, "completion": " y"}, {"text": "short"}, {"prompt": "z " * 40, "completion": " w"}]
    unlabelled = []
    seqs = list(iter_sequences(rows, tok, DataConfig(max_length=8), unlabelled_rows=unlabelled))
    assert len(seqs) == 1 and unlabelled == [0, 2]


@pytest.mark.parametrize("packing", [False, True])
def test_rows_cut_by_max_length_are_counted_once_cached(tok, packing):
    rows = [{"text": "a b c d e f g h i j k l m n o p q r s t"}, {"text": "short"}, {"text": "u v w x y z " * 6}, {"text": "ok"}]
    lengths = [len(tokenize_example(r, i, tok, DataConfig(max_length=10_000), [])[0]) for i, r in enumerate(rows)]
    truncated = []
    seqs = list(iter_sequences(rows, tok, DataConfig(max_length=8, packing=packing), truncated_rows=truncated))
    assert lengths[0] > 8 and lengths[2] > 8 and lengths[1] <= 8 and lengths[3] <= 8
    assert truncated == [0, 2]
    assert sum(e - s for seq in seqs for s, e in seq.segments) == sum(min(n, 8) for n in lengths)
    # A cap that stops before the second long row: only what was cached is counted.
    capped = []
    list(iter_sequences(rows, tok, DataConfig(max_length=8, max_sequences=1), truncated_rows=capped))
    assert capped == [0]


def test_a_percent_slice_of_jsonl_reads_line_by_line_and_rows_keep_their_numbers(tmp_path, tok):
    """A percent slice of JSONL went through datasets' whole-file JSON parser: one broken line ended
    the run (not skippable); and row numbers in messages counted from the slice's start."""
    import datasets

    lines = [json.dumps({"text": f"row {i}"}) for i in range(20)]
    lines[12] = '{"text": "broken'
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines))
    clean = tmp_path / "clean.jsonl"
    clean.write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(20)))
    for split in ("train[10%:70%]", "train[:33%]", "train[55%:]"):  # the rows datasets itself gives for the slice
        want = [r["text"] for r in datasets.load_dataset("json", data_files=str(clean), split=split)]
        assert [r["text"] for r in load_examples(str(clean), split=split)] == want, split
    with pytest.raises(ValueError, match=r"split='train\[98%:\]' selects none of the 20 rows of the data"):
        load_examples(str(clean), split="train[98%:]")
    skipped = []
    rows = load_examples(str(path), split="train[50%:80%]")  # rows 10-15
    seqs = list(iter_sequences(rows, tok, DataConfig(skip_bad_rows=True), bad_rows=skipped, first_row=10))
    assert len(seqs) == 5 and len(skipped) == 1 and skipped[0].startswith("row 12: line 13 of"), skipped
    with pytest.raises(BadRowError, match=r"^row 12: "):
        list(iter_sequences(load_examples(str(path), split="train[10:16]"), tok, DataConfig(), first_row=10))


def test_a_byte_order_mark_of_a_text_file_is_not_cached(tmp_path, tok):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffhello world\nsecond line\n".encode("utf-8"))
    rows = list(load_examples(str(path)))
    ids, _ = tokenize_example(rows[0], 0, tok, DataConfig(add_bos=False, add_eos=False))
    assert tok.decode(ids) == "hello world"


def test_count_rows_gives_what_load_examples_reads(tmp_path):
    from geocache.data import count_rows

    rows = [{"text": f"row {i}"} for i in range(7)]
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:4]) + "\n\n")
    (tmp_path / "j" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows[4:]))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("text\n" + "\n".join(r["text"] for r in rows) + "\n")
    (tmp_path / "d.txt").write_text("one\ntwo\n\n\nthree\nfour\n\nfive\n")
    for path, cfg in [("j", DataConfig()), ("d.parquet", DataConfig()), ("d.csv", DataConfig()), ("d.txt", DataConfig()),
                      ("d.txt", DataConfig(text_sample_by="paragraph")), ("d.txt", DataConfig(text_sample_by="document"))]:
        got = count_rows(str(tmp_path / path), cfg)
        assert got == len(list(load_examples(str(tmp_path / path), text_sample_by=cfg.text_sample_by))), (path, cfg.text_sample_by)
    (tmp_path / "arr.json").write_text(json.dumps(rows))
    assert count_rows(str(tmp_path / "arr.json"), DataConfig()) is None  # a JSON array: unknown until parsed
    assert count_rows(str(tmp_path / "d.csv"), DataConfig(split="train[:3]")) is None
    assert count_rows("org/corpus", DataConfig()) is None


def test_sequences_record_the_rows_read_when_they_were_complete(tok):
    rows = [{"text": "a b c"}, {"text": "d"}, {"prompt": "x " * 40, "completion": " y"}, {"text": "e f"}]
    single = list(iter_sequences(rows, tok, DataConfig(max_length=8)))
    assert [s.rows_read for s in single] == [1, 2, 4]
    packed = list(iter_sequences(rows, tok, DataConfig(max_length=64, packing=True)))
    assert [s.rows_read for s in packed] == [4]
    # a row that does not fit closes the pending sequence before it is read into the next one
    long = [{"text": "a " * 20}, {"text": "b " * 20}, {"text": "c"}]
    packed = list(iter_sequences(long, tok, DataConfig(max_length=30, packing=True)))
    assert [s.rows_read for s in packed] == [1, 3] and [len(s.segments) for s in packed] == [1, 2]


def test_a_jsonl_line_that_is_not_json_is_a_bad_row_naming_its_file_and_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good row"}\n\n{"text": broken\n[1, 2]\n{"text": "another"}\n')
    rows = list(load_examples(str(path)))
    assert len(rows) == 4 and rows[0] == {"text": "good row"} and rows[3] == {"text": "another"}
    with pytest.raises(BadRowError, match=rf"row 1: line 3 of {path} is not valid JSON \(Expecting value at column 10\)"):
        list(iter_sequences(rows, tok, DataConfig()))
    bad = []
    seqs = list(iter_sequences(load_examples(str(path)), tok, DataConfig(skip_bad_rows=True), bad))
    assert len(seqs) == 2 and len(bad) == 2 and "row 2: line 4" in bad[1] and "holds a list, not an object" in bad[1]


def test_a_byte_order_mark_is_not_data(tmp_path, tok):
    (tmp_path / "d.csv").write_bytes("\ufeffprompt,completion\nWhy?,Because.\n".encode("utf-8"))
    assert list(load_examples(str(tmp_path / "d.csv"))) == [{"prompt": "Why?", "completion": "Because."}]
    (tmp_path / "d.jsonl").write_bytes('\ufeff{"text": "first"}\r\n{"text": "second"}\r\n'.encode("utf-8"))
    rows = list(load_examples(str(tmp_path / "d.jsonl")))
    assert rows == [{"text": "first"}, {"text": "second"}]
    assert len(list(iter_sequences(rows, tok, DataConfig()))) == 2


def test_a_row_slice_of_local_jsonl_streams_through_the_line_reader(tmp_path, tok):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(6)) + "\n{not json\n")
    rows = list(load_examples(str(tmp_path / "d.jsonl"), split="train[2:4]"))
    assert rows == [{"text": "row 2"}, {"text": "row 3"}]
