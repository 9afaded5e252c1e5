"""Router prompts (golden, byte-exact, reference §4.3) and router output parsing.

The expected templates are written out here literally from the reference text, not taken
from the module, so a drift in the module's template constants fails these tests.
"""

from __future__ import annotations

import json

import pytest

from plano_extproc.routing.base import ChatMessage, RoutePreference
from plano_extproc.routing.orchestrator import (
    MAX_ROUTING_TURNS,
    RouterOutputError,
    _parse_reply,
    build_arch_router_prompt,
    build_orchestrator_prompt,
    parse_route_output,
    select_messages,
)

ORCH_HEAD = (
    "\n"
    "You are a helpful assistant that selects the most suitable routes based on user intent.\n"
    "You are provided with a list of available routes enclosed within <routes></routes> XML tags:\n"
    "<routes>\n"
)
ORCH_MIDDLE = (
    "\n"
    "</routes>\n"
    "\n"
    "You are also given the conversation context enclosed within <conversation></conversation>"
    " XML tags:\n"
    "<conversation>\n"
)
ORCH_TAIL = (
    "\n"
    "</conversation>\n"
    "\n"
    "## Instructions\n"
    "1. Analyze the latest user intent from the conversation.\n"
    "2. Compare it against the available routes to find which routes can help fulfill the"
    " request.\n"
    "3. Respond only with the exact route names from <routes>.\n"
    "4. If no routes can help or the intent is already fulfilled, return an empty list.\n"
    "\n"
    "## Response Format\n"
    "Return your answer strictly in JSON as follows:\n"
    '{{"route": ["route_name_1", "route_name_2", "..."]}}\n'
    "If no routes are needed, return an empty list for `route`.\n"
)
# The template as the model saw it, placeholders included (its length seeds the token count).
ORCH_TEMPLATE = ORCH_HEAD + "{routes}" + ORCH_MIDDLE + "{conversation}" + ORCH_TAIL
ORCH_TEMPLATE_TOKENS = len(ORCH_TEMPLATE.encode()) // 4

ARCH_HEAD = (
    "\n"
    "You are a helpful assistant designed to find the best suited route.\n"
    "You are provided with route description within <routes></routes> XML tags:\n"
    "<routes>\n"
)
ARCH_MIDDLE = "\n</routes>\n\n<conversation>\n"
ARCH_TAIL = (
    "\n"
    "</conversation>\n"
    "\n"
    "Your task is to decide which route is best suit with user intent on the conversation in"
    " <conversation></conversation> XML tags.  Follow the instruction:\n"
    "1. If the latest intent from user is irrelevant or user intent is full filled, response"
    ' with other route {"route": "other"}.\n'
    "2. You must analyze the route descriptions and find the best match route for user latest"
    " intent.\n"
    "3. You only response the name of the route that best matches the user's request, use the"
    " exact name in the <routes></routes>.\n"
    "\n"
    "Based on your analysis, provide your response in the following JSON formats if you decide"
    " to match any route:\n"
    '{"route": "route_name"}\n'
)

PREFS = (
    RoutePreference(
        "code_generation", "generating new code, writing functions", ("anthropic/claude",)
    ),
    RoutePreference("complex_reasoning", "multi-step analysis", ("openai/gpt-4o",)),
)

CONVERSATION = [
    ChatMessage("system", "You are terse."),
    ChatMessage("user", "Write a binary search in Python"),
    ChatMessage("assistant", "Sure, here it is."),
    ChatMessage("tool", '{"result": 42}'),
    ChatMessage("developer", "Be nice."),
    ChatMessage("assistant", ""),
    ChatMessage("user", 'Now explain its complexity — O(log n)? "quoted" \\ é 😀'),
]

ORCH_ROUTES = (
    '{"name": "code_generation", "description": "generating new code, writing functions", '
    '"parameters": {"type": "object", "properties": {}, "required": []}}\n'
    '{"name": "complex_reasoning", "description": "multi-step analysis", '
    '"parameters": {"type": "object", "properties": {}, "required": []}}'
)
ORCH_CONVERSATION = (
    "[\n"
    "    {\n"
    '        "role": "user",\n'
    '        "content": "Write a binary search in Python"\n'
    "    },\n"
    "    {\n"
    '        "role": "assistant",\n'
    '        "content": "Sure, here it is."\n'
    "    },\n"
    "    {\n"
    '        "role": "user",\n'
    '        "content": "Now explain its complexity — O(log n)? \\"quoted\\" \\\\ é 😀"\n'
    "    }\n"
    "]"
)


# --------------------------------------------------------------------------- golden prompts


def test_orchestrator_prompt_golden() -> None:
    prompt = build_orchestrator_prompt(CONVERSATION, PREFS)
    expected = ORCH_HEAD + ORCH_ROUTES + ORCH_MIDDLE + ORCH_CONVERSATION + ORCH_TAIL
    assert prompt == expected
    assert prompt.startswith("\nYou are a helpful assistant that selects")
    assert prompt.endswith("an empty list for `route`.\n")
    # The doubled braces of the response-format line are sent literally.
    assert '\n{{"route": ["route_name_1", "route_name_2", "..."]}}\n' in prompt


def test_orchestrator_prompt_full_literal() -> None:
    # The same golden prompt, one line per list item, for a one-route one-message request.
    prompt = build_orchestrator_prompt(
        [ChatMessage("user", "hi")], [RoutePreference("chat", "small talk")]
    )
    assert prompt.split("\n") == [
        "",
        "You are a helpful assistant that selects the most suitable routes based on user intent.",
        "You are provided with a list of available routes enclosed within <routes></routes> XML"
        " tags:",
        "<routes>",
        '{"name": "chat", "description": "small talk", "parameters": {"type": "object",'
        ' "properties": {}, "required": []}}',
        "</routes>",
        "",
        "You are also given the conversation context enclosed within <conversation></conversation>"
        " XML tags:",
        "<conversation>",
        "[",
        "    {",
        '        "role": "user",',
        '        "content": "hi"',
        "    }",
        "]",
        "</conversation>",
        "",
        "## Instructions",
        "1. Analyze the latest user intent from the conversation.",
        "2. Compare it against the available routes to find which routes can help fulfill the"
        " request.",
        "3. Respond only with the exact route names from <routes>.",
        "4. If no routes can help or the intent is already fulfilled, return an empty list.",
        "",
        "## Response Format",
        "Return your answer strictly in JSON as follows:",
        '{{"route": ["route_name_1", "route_name_2", "..."]}}',
        "If no routes are needed, return an empty list for `route`.",
        "",
    ]


def test_arch_router_prompt_golden() -> None:
    prompt = build_arch_router_prompt(CONVERSATION, PREFS)
    routes = (
        '[{"name":"code_generation","description":"generating new code, writing functions"},'
        '{"name":"complex_reasoning","description":"multi-step analysis"}]'
    )
    conversation = (
        '[{"role":"user","content":"Write a binary search in Python"},'
        '{"role":"assistant","content":"Sure, here it is."},'
        '{"role":"user","content":"Now explain its complexity — O(log n)? \\"quoted\\" \\\\ é 😀"}]'
    )
    assert prompt == ARCH_HEAD + routes + ARCH_MIDDLE + conversation + ARCH_TAIL
    assert "XML tags.  Follow the instruction:" in prompt  # two spaces
    assert prompt.endswith('{"route": "route_name"}\n')


def test_route_lines_use_spaced_separators_and_key_order() -> None:
    prefs = [
        RoutePreference("a b", 'says "hi"\nand more', examples=("ignored",), prefer="cheapest"),
        RoutePreference("ü", "ünïcode"),
    ]
    prompt = build_orchestrator_prompt([ChatMessage("user", "x")], prefs)
    routes = prompt[len(ORCH_HEAD) : prompt.index(ORCH_MIDDLE)]
    lines = routes.split("\n")
    assert lines == [
        '{"name": "a b", "description": "says \\"hi\\"\\nand more", "parameters": '
        '{"type": "object", "properties": {}, "required": []}}',
        '{"name": "ü", "description": "ünïcode", "parameters": '
        '{"type": "object", "properties": {}, "required": []}}',
    ]
    assert [list(json.loads(line)) for line in lines] == [["name", "description", "parameters"]] * 2


def test_route_order_follows_preferences() -> None:
    prompt = build_orchestrator_prompt([ChatMessage("user", "x")], list(reversed(PREFS)))
    assert prompt.index('"complex_reasoning"') < prompt.index('"code_generation"')


def _conversation_of(prompt: str) -> list[dict[str, str]]:
    start = prompt.index("<conversation>\n") + len("<conversation>\n")
    return json.loads(prompt[start : prompt.index("\n</conversation>")])


def test_conversation_is_four_space_json_with_role_and_content_only() -> None:
    prompt = build_orchestrator_prompt(CONVERSATION, PREFS)
    conv = _conversation_of(prompt)
    assert [m["role"] for m in conv] == ["user", "assistant", "user"]
    assert all(list(m) == ["role", "content"] for m in conv)
    assert "\n    {\n        " in prompt
    assert "\\u" not in prompt  # ensure_ascii=False: é and 😀 stay literal


# --------------------------------------------------------------------------- selection


def msgs(*pairs: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(r, c) for r, c in pairs]


def test_role_filtering_and_empty_messages() -> None:
    selected = select_messages(CONVERSATION, max_tokens=8192, template=ORCH_TEMPLATE)
    assert [(m.role, m.content[:5]) for m in selected] == [
        ("user", "Write"),
        ("assistant", "Sure,"),
        ("user", "Now e"),
    ]
    whitespace = msgs(("user", "a"), ("assistant", "  \n"), ("user", "b"))
    assert [m.content for m in select_messages(whitespace, max_tokens=8192, template="")] == [
        "a",
        "b",
    ]


def test_only_ignored_roles_selects_nothing() -> None:
    only = msgs(("system", "s"), ("tool", "t"), ("developer", "d"), ("user", ""))
    assert select_messages(only, max_tokens=8192, template=ORCH_TEMPLATE) == []
    prompt = build_orchestrator_prompt(only, PREFS)
    assert _conversation_of(prompt) == []
    assert "<conversation>\n[]\n</conversation>" in prompt


def test_sixteen_turn_cap() -> None:
    assert MAX_ROUTING_TURNS == 16
    conv: list[ChatMessage] = []
    for i in range(20):
        conv.append(ChatMessage("system", f"sys {i}"))
        conv.append(ChatMessage("user" if i % 2 == 0 else "assistant", f"turn {i}"))
    conv.append(ChatMessage("user", "turn 20"))
    prompt = build_orchestrator_prompt(conv, PREFS)
    contents = [m["content"] for m in _conversation_of(prompt)]
    assert contents == [f"turn {i}" for i in range(5, 21)]


def test_arch_router_has_no_turn_cap() -> None:
    conv = [ChatMessage("user" if i % 2 == 0 else "assistant", f"t{i}") for i in range(21)]
    prompt = build_arch_router_prompt(conv, PREFS)
    start = prompt.index("<conversation>\n") + len("<conversation>\n")
    selected = json.loads(prompt[start : prompt.index("\n</conversation>")])
    assert len(selected) == 21


def test_template_tokens_literal_matches_reference_length() -> None:
    # Guards the literal above: the reference template is 846 bytes with placeholders.
    assert len(ORCH_TEMPLATE.encode()) == 846
    assert ORCH_TEMPLATE_TOKENS == 211


def test_budget_walk_stops_at_first_overflow() -> None:
    conv = msgs(("user", "a" * 100), ("assistant", "b" * 20), ("user", "c" * 20))
    # 10 tokens after the template: c (5) + b (5) fit, a (25) does not and no budget remains.
    selected = select_messages(conv, max_tokens=ORCH_TEMPLATE_TOKENS + 10, template=ORCH_TEMPLATE)
    assert [m.content for m in selected] == ["b" * 20, "c" * 20]


def test_budget_counts_utf8_bytes() -> None:
    # 10 x "é" = 20 bytes = 5 tokens; 10 x "e" = 10 bytes = 2 tokens.
    conv = msgs(("user", "é" * 10), ("assistant", "e" * 10))
    selected = select_messages(conv, max_tokens=ORCH_TEMPLATE_TOKENS + 6, template=ORCH_TEMPLATE)
    # e costs 2 (fits), é costs 5 > 4 remaining: trimmed to 16 bytes.
    assert selected[1].content == "e" * 10
    assert selected[0].content == "é" * 4 + "…" + "é" * 3


def test_overflowing_user_message_is_middle_trimmed() -> None:
    long = "".join(chr(ord("A") + i % 26) for i in range(100))  # 100 bytes, 25 tokens
    conv = msgs(("user", long), ("assistant", "x" * 8))
    selected = select_messages(conv, max_tokens=ORCH_TEMPLATE_TOKENS + 10, template=ORCH_TEMPLATE)
    # assistant costs 2; 8 tokens remain → 32 bytes: 19 head (60%), "…", 13 tail (40%).
    assert [m.role for m in selected] == ["user", "assistant"]
    assert selected[0].content == long[:19] + "…" + long[-13:]
    assert selected[1].content == "x" * 8


def test_overflowing_assistant_message_is_dropped() -> None:
    conv = msgs(("user", "u" * 8), ("assistant", "a" * 100), ("user", "q" * 8))
    selected = select_messages(conv, max_tokens=ORCH_TEMPLATE_TOKENS + 10, template=ORCH_TEMPLATE)
    assert [m.content for m in selected] == ["q" * 8]


def test_middle_trim_is_char_boundary_safe() -> None:
    cases = [
        ("é" * 50, "é" * 9 + "…" + "é" * 6),  # 2-byte chars: 19 → 18 bytes, 13 → 12 bytes
        ("😀" * 30, "😀" * 4 + "…" + "😀" * 3),  # 4-byte chars: 19 → 16, 13 → 12
        ("日本語" * 20, "日本語日本語" + "…" + "語日本語"),  # 3-byte chars: 19 → 18, 13 → 12
    ]
    for text, expected in cases:
        conv = msgs(("user", text), ("assistant", "x" * 8))
        sel = select_messages(conv, max_tokens=ORCH_TEMPLATE_TOKENS + 10, template=ORCH_TEMPLATE)
        assert sel[0].content == expected
        assert "\ufffd" not in sel[0].content
        sel[0].content.encode("utf-8")  # well-formed


def test_nothing_selected_keeps_last_message_whole() -> None:
    huge = "z" * 40_000  # 10,000 tokens > 8192
    conv = msgs(("user", "earlier"), ("user", huge))
    selected = select_messages(conv, max_tokens=ORCH_TEMPLATE_TOKENS, template=ORCH_TEMPLATE)
    assert selected == [ChatMessage("user", huge)]
    # Overflowing newest assistant turn: nothing fits, so it is included whole.
    conv = msgs(("user", "q"), ("assistant", huge))
    selected = select_messages(conv, max_tokens=8192, template=ORCH_TEMPLATE)
    assert selected == [ChatMessage("assistant", huge)]


def test_default_budget_is_8192_with_trim() -> None:
    huge = "0123456789" * 4000  # 40,000 bytes
    prompt = build_orchestrator_prompt(msgs(("user", huge)), PREFS)
    content = _conversation_of(prompt)[0]["content"]
    budget = (8192 - ORCH_TEMPLATE_TOKENS) * 4
    head, tail = int(budget * 0.6), budget - int(budget * 0.6)
    assert content == huge[:head] + "…" + huge[-tail:]


def test_context_length_is_honoured() -> None:
    text = "w" * 4000  # 1000 tokens
    small = build_orchestrator_prompt(msgs(("user", text)), PREFS, max_tokens=1000)
    big = build_orchestrator_prompt(msgs(("user", text)), PREFS, max_tokens=2000)
    assert "…" in _conversation_of(small)[0]["content"]
    assert _conversation_of(big)[0]["content"] == text


def test_arch_router_keeps_overflowing_user_message_whole() -> None:
    huge = "y" * 20_000  # 5000 tokens > 2048
    prompt = build_arch_router_prompt(msgs(("assistant", "a"), ("user", huge)), PREFS)
    assert f'[{{"role":"user","content":"{huge}"}}]' in prompt


# --------------------------------------------------------------------------- output parsing

NAMES = ["code_generation", "complex_reasoning"]


@pytest.mark.parametrize(
    ("content", "route"),
    [
        ('{"route": ["code_generation"]}', "code_generation"),
        ('{"route": ["complex_reasoning", "code_generation"]}', "complex_reasoning"),
        ('{"route": "code_generation"}', "code_generation"),
        ('  {"route":"complex_reasoning"}  \n', "complex_reasoning"),
        ('```json\n{"route": ["code_generation"]}\n```', "code_generation"),
        ('```\n{"route": "code_generation"}\n```', "code_generation"),
        ("{'route': ['code_generation']}", "code_generation"),
        ("{'route': 'complex_reasoning'}", "complex_reasoning"),
        ('{"route":\\n ["code_generation"]\\n}', "code_generation"),
        ('Sure! {"route": ["code_generation"]} hope that helps', "code_generation"),
        ('{"route": ["unknown", "code_generation"]}', "code_generation"),
        ('{"route": [null, 3, "", "code_generation"]}', "code_generation"),
        ('{"route": ["unknown"]}', None),
        ('{"route": "unknown"}', None),
        ('{"route": []}', None),
        ('{"route": null}', None),
        ('{"route": ""}', None),
        ('{"route": "other"}', None),
        ('{"route": ["other"]}', None),
        ('{"route": ["other", "code_generation"]}', "code_generation"),
        (None, None),
        ("", None),
        ("   \n", None),
    ],
)
def test_parse_route_output(content: str | None, route: str | None) -> None:
    assert parse_route_output(content, NAMES) == route


def test_names_must_match_exactly() -> None:
    assert parse_route_output('{"route": ["Code_Generation"]}', NAMES) is None
    assert parse_route_output('{"route": ["code_generation "]}', NAMES) is None
    assert parse_route_output('{"route": ["code_generation"]}', []) is None


@pytest.mark.parametrize(
    "content",
    [
        "code_generation",
        "I cannot decide",
        "{not json}",
        "[]",
        '["code_generation"]',
        '{"routes": ["code_generation"]}',
        '{"route": 5}',
        '{"route": {"name": "code_generation"}}',
        '{"route": true}',
        "```json\n```",
    ],
)
def test_garbage_raises(content: str) -> None:
    with pytest.raises(RouterOutputError):
        parse_route_output(content, NAMES)


def test_router_output_error_is_a_value_error() -> None:
    assert issubclass(RouterOutputError, ValueError)


# --------------------------------------------------------------------------- hostile replies
# Issue 11 items 3 and 11: reply parsing is total, and its errors never quote the reply (they are
# shown to any client of /routing/v1/* and logged).


def _reply(content: object) -> bytes:
    return json.dumps(
        {"choices": [{"message": {"role": "assistant", "content": content}}]}
    ).encode()


def test_parse_reply_reads_a_chat_completion() -> None:
    result = _parse_reply(_reply('{"route": ["code_generation"]}'), NAMES)
    assert (result.route, result.error) == ("code_generation", None)
    assert _parse_reply(b'{"choices": []}', NAMES).error is None


SECRET = "sk-router-SECRET"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"choices": {"0": {"message": {"content": "x"}}}}', "had an unexpected shape"),
        (b'{"choices": "sk-router-SECRET"}', "had an unexpected shape"),
        (b'{"choices": [5]}', "had an unexpected shape"),
        (b'{"choices": [{"message": "sk-router-SECRET"}]}', "had an unexpected shape"),
        (_reply({"route": "code_generation"}), "had an unexpected shape"),
        (_reply(["sk-router-SECRET"]), "had an unexpected shape"),
        (b"[1, 2]", "had an unexpected shape"),
        (b'"sk-router-SECRET"', "had an unexpected shape"),
        (b"{}", "had an unexpected shape"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"choices": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001, "nested too deeply"),
        (_reply("[" * 100_000 + "]" * 100_000), "nested too deeply"),
        (b"1" * 10_000, "not valid JSON"),  # int() digit limit: a ValueError
        (b"bad key sk-router-SECRET", "not valid JSON"),
        (b"\xff\xfe{", "not valid JSON"),
        (_reply("the key is sk-router-SECRET"), "content was not JSON"),
        (_reply('{"routes": "sk-router-SECRET"}'), "content was not an object with 'route'"),
        (_reply('{"route": {"sk-router-SECRET": 1}}'), "'route' was not a string or a list"),
    ],
)
def test_parse_reply_is_total_and_never_quotes_the_reply(raw: bytes, reason: str) -> None:
    result = _parse_reply(raw, NAMES)
    assert result.route is None
    assert result.error is not None and reason in result.error
    assert SECRET not in result.error and len(result.error) < 80


def test_parse_route_output_errors_do_not_quote_the_content() -> None:
    for content in ["the key is sk-router-SECRET", '{"routes": "sk-router-SECRET"}']:
        with pytest.raises(RouterOutputError) as ei:
            parse_route_output(content, NAMES)
        assert SECRET not in str(ei.value)
