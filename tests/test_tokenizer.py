"""The shipped Qwen3 tokenizer gives the reference ids; chat rendering follows the template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvforge import InvalidInputError, PromptTokenizer, UnsupportedInputError

DATA = Path(__file__).parent / "data"
VECTORS = json.loads((DATA / "qwen3_test_vectors.json").read_text())["cases"]


def test_thirty_vectors() -> None:
    assert len(VECTORS) == 30


@pytest.mark.parametrize("case", VECTORS, ids=lambda c: c["name"])
def test_reference_ids(qwen3: PromptTokenizer, case: dict) -> None:
    tp = qwen3.encode_text(case["text"])
    assert list(tp.token_ids) == case["ids"]
    # offsets cover the text: every token maps back to a span of it
    if tp.token_ids:
        assert tp.offsets is not None and tp.offsets.shape == (len(tp), 2)
        assert tp.char_span(0, len(tp)) == (tp.offsets[0, 0], tp.offsets[-1, 1])


def test_offsets_reproduce_block_text(qwen3: PromptTokenizer) -> None:
    text = "The planner reads the tool list. " * 30
    tp = qwen3.encode_text(text)
    pieces = []
    for start in range(0, len(tp), 16):
        s, e = tp.char_span(start, min(start + 16, len(tp)))
        pieces.append(text[s:e])
    assert "".join(pieces) == text


def test_chat_render_matches_the_template_format(qwen3: PromptTokenizer) -> None:
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi"},
    ]
    assert qwen3.render_chat(msgs) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    tp = qwen3.encode_chat(msgs)
    assert tp.kind == "chat"
    # special tokens are single ids, parsed from the rendered text
    assert tp.token_ids[0] == 151644 and tp.token_ids.count(151645) == 2
    assert list(tp.token_ids) == list(qwen3.encode_text(tp.text).token_ids)


def test_chat_vector_round_trip(qwen3: PromptTokenizer) -> None:
    case = next(c for c in VECTORS if c["name"] == "chat_nothink")
    rendered = qwen3.render_chat([{"role": "user", "content": "Hi"}], enable_thinking=False)
    assert rendered == case["text"]
    assert (
        list(
            qwen3.encode_chat([{"role": "user", "content": "Hi"}], enable_thinking=False).token_ids
        )
        == case["ids"]
    )


def test_chat_with_tools_and_tool_calls(qwen3: PromptTokenizer) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "天气",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in 北京?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "北京"}'},
                }
            ],
        },
        {"role": "tool", "content": "sunny"},
    ]
    out = qwen3.render_chat(msgs, tools=tools)
    assert out.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert json.dumps(tools[0], ensure_ascii=False) in out  # tojson keeps non-ASCII
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>' in out
    )
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n" in out
    assert out.endswith("<|im_start|>assistant\n")


def test_list_content_parts_are_joined(qwen3: PromptTokenizer) -> None:
    a = qwen3.render_chat(
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ]
    )
    assert a == qwen3.render_chat([{"role": "user", "content": "a\nb"}])
    with pytest.raises(UnsupportedInputError, match="image_url"):
        qwen3.render_chat([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_dispatch_and_bad_input(qwen3: PromptTokenizer) -> None:
    assert qwen3.tokenize([1, 2, 3]).token_ids == (1, 2, 3)
    assert qwen3.tokenize("hi").kind == "text"
    assert qwen3.tokenize([{"role": "user", "content": "hi"}]).kind == "chat"
    for bad in (b"bytes", 3.5, [1.5], ["7"], [-1], [10**9], [2**70], [{"content": "no role"}]):
        with pytest.raises(InvalidInputError):
            qwen3.tokenize(bad)  # type: ignore[arg-type]


def test_local_tokenizer_file(tmp_path: Path, qwen3: PromptTokenizer) -> None:
    (tmp_path / "tokenizer.json").write_text(qwen3._tk.to_str())
    local = PromptTokenizer.from_file(tmp_path / "tokenizer.json")
    assert local.encode_text("hello world").token_ids == qwen3.encode_text("hello world").token_ids
    with pytest.raises(InvalidInputError, match="no chat template"):
        local.encode_chat([{"role": "user", "content": "x"}])
    with pytest.raises(InvalidInputError, match="not found"):
        PromptTokenizer.from_file(tmp_path / "missing.json")


# ---- the piecewise cache and the fast encoder: always HF's ids ----------------------------

SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
    "<|vision_start|>",
]


def _hf(qwen3: PromptTokenizer, text: str, special: bool = True) -> list[int]:
    return qwen3._tk.encode(text, add_special_tokens=special).ids


def test_the_fast_path_is_active_for_the_shipped_tokenizer(qwen3: PromptTokenizer) -> None:
    assert qwen3.pieces is not None and qwen3.fast is not None


@pytest.mark.parametrize("case", VECTORS, ids=lambda c: c["name"])
def test_fast_and_piecewise_encoders_give_the_reference_ids(
    qwen3: PromptTokenizer, case: dict
) -> None:
    assert qwen3.pieces is not None
    for scope in ("t1", "t1", "t2"):  # a miss, a hit, another scope
        assert qwen3.pieces.encode(case["text"], scope) == case["ids"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.text(max_size=80),
            st.sampled_from(SPECIALS),
            st.text(alphabet=" \t\n\r", max_size=5),
            st.text(alphabet=st.characters(codec="utf-8"), max_size=400),
        ),
        max_size=8,
    )
)
def test_piecewise_equals_a_whole_encode_on_random_text_with_special_tokens(
    qwen3: PromptTokenizer, parts: list[str]
) -> None:
    text = "".join(parts)
    want = _hf(qwen3, text)
    assert list(qwen3.encode_text(text, scope="prop").token_ids) == want
    assert list(qwen3.encode_text(text, scope="prop").token_ids) == want  # from the cache
    assert qwen3.fast is not None and qwen3.fast(text.replace("<", "")) == _hf(
        qwen3, text.replace("<", ""), special=False
    )


def test_fast_encoder_on_every_text_we_ship(qwen3: PromptTokenizer) -> None:
    root = Path(__file__).resolve().parents[1]
    files = [
        *sorted((root / "src").rglob("*.py")),
        *sorted(root.glob("*.md")),
        *sorted((root / "docs").glob("*.md")),
        *sorted((root / "tests/data").glob("*.json")),
        root / "src/kvforge/tokenize/data/qwen3/LICENSE",
    ]
    total = 0
    for f in files:
        text = f.read_text("utf-8", errors="replace")
        assert list(qwen3.encode_text(text, scope="corpus").token_ids) == _hf(qwen3, text), f
        total += len(text)
    assert total > 200_000


def test_chat_pieces_repeat_across_requests_and_stay_per_tenant(qwen3: PromptTokenizer) -> None:
    system = "You are one agent of a code-review pipeline. Follow the shared rules. " * 60
    tools = [
        {
            "type": "function",
            "function": {
                "name": "run_tests",
                "description": "x " * 300,
                "parameters": {"type": "object"},
            },
        }
    ]
    pieces = qwen3.pieces
    assert pieces is not None
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "first " * 80}]
    a = qwen3.encode_chat(msgs, tools=tools, scope="tenant-a")
    hits = pieces.hits
    msgs2 = [*msgs, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    b = qwen3.encode_chat(msgs2, tools=tools, scope="tenant-a")
    assert pieces.hits >= hits + 2  # the system+tools piece and the first turn
    assert list(b.token_ids) == _hf(qwen3, b.text or "", special=False)
    assert list(a.token_ids) == _hf(qwen3, a.text or "", special=False)
    # another tenant sending the same prompt never hits tenant-a's pieces
    hits = pieces.hits
    c = qwen3.encode_chat(msgs, tools=tools, scope="tenant-b")
    assert pieces.hits == hits and c.token_ids == a.token_ids
    # offsets (for reports) are computed on demand and match the text
    assert not c.has_offsets and c.char_span(0, 1) == (0, len("<|im_start|>"))


# ---- vLLM's render options (golden renders read off the shipped Qwen3 template) ------------
USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
HEAD = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_render_options_follow_vllm(qwen3: PromptTokenizer) -> None:
    from kvforge.tokenize import ChatOptions

    def render(chat: ChatOptions | None, msgs: list[dict] = USER) -> str:
        tp = qwen3.encode_chat(msgs, chat=chat)
        assert list(tp.token_ids) == list(qwen3.encode_text(tp.text or "").token_ids)
        return tp.text or ""

    assert render(None) == HEAD + "<|im_start|>assistant\n"
    no_think = ChatOptions(chat_template_kwargs={"enable_thinking": False})
    assert render(no_think) == HEAD + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert render(ChatOptions(add_generation_prompt=False)) == HEAD
    # the kwargs are merged over the flags, as vLLM merges them
    assert render(ChatOptions(chat_template_kwargs={"add_generation_prompt": False})) == HEAD
    # continue the final (assistant) message: the text stops right after its content
    partial = [*USER, {"role": "assistant", "content": "Sure, the answer is"}]
    cont = ChatOptions(add_generation_prompt=False, continue_final_message=True)
    assert render(cont, partial) == (
        HEAD + "<|im_start|>assistant\n<think>\n\n</think>\n\nSure, the answer is"
    )
    # trailing spaces the template keeps are kept
    spaced = [*USER, {"role": "assistant", "content": "Sure, "}]
    assert render(cont, spaced).endswith("\n\nSure, ")


def test_render_options_refused_like_vllm(qwen3: PromptTokenizer) -> None:
    from kvforge.tokenize import ChatOptions

    with pytest.raises(InvalidInputError, match="cannot both be true"):
        ChatOptions(continue_final_message=True)  # add_generation_prompt defaults to true
    with pytest.raises(InvalidInputError, match="cannot both be true"):
        ChatOptions(
            add_generation_prompt=False,
            continue_final_message=True,
            chat_template_kwargs={"add_generation_prompt": True},
        )
    with pytest.raises(InvalidInputError, match="may not set messages"):
        ChatOptions(chat_template_kwargs={"messages": []})
    with pytest.raises(InvalidInputError, match="booleans"):
        ChatOptions(add_generation_prompt="yes")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="chat messages only"):
        qwen3.tokenize("text", chat=ChatOptions(add_generation_prompt=False))
    assert ChatOptions.from_fields() is None
    assert ChatOptions.from_fields(None, None, {}) is None


def test_tools_are_rendered_as_vllm_dumps_them(qwen3: PromptTokenizer) -> None:
    """vLLM's request model fills a function's missing description/parameters with null and
    dumps its declared keys first (type, function: name, description, parameters), then any
    others: the template sees that, whatever order the client wrote."""
    given = [{"function": {"parameters": {"type": "object"}, "name": "f", "strict": True}}]
    out = qwen3.render_chat(USER, tools=given)
    want = (
        '{"type": "function", "function": {"name": "f", "description": null, '
        '"parameters": {"type": "object"}, "strict": true}}'
    )
    assert "\n" + want + "\n</tools>" in out
    bare = qwen3.render_chat(USER, tools=[{"type": "function", "function": {"name": "g"}}])
    assert (
        '{"type": "function", "function": {"name": "g", "description": null, '
        '"parameters": null}}' in bare
    )
    for bad, why in (
        ([{"type": "custom", "custom": {}}], "only function tools"),
        ([{"type": "function", "function": {"description": "x"}}], "string 'name'"),
        ([{"type": "function", "function": {"name": "h", "parameters": [1]}}], "object"),
    ):
        with pytest.raises(InvalidInputError, match=why):
            qwen3.render_chat(USER, tools=bad)
