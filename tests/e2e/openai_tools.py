"""Tool calling through a tensorlet node's `openai` app, with the official OpenAI Python client.

Run by tests/e2e/llm.rs: python3 openai_tools.py BASE_URL CA_CERT MODEL, where MODEL's chat
template offers tools and `smollm2` (the same weights, its own template) does not. Prints one
JSON object with what it saw; any failed expectation raises (non-zero exit).
"""
import json
import sys

import openai

base_url, ca_cert, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key="unused", http_client=openai.DefaultHttpxClient(verify=ca_cert), max_retries=0)

weather = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
clock = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}
asked = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_call(call, name):
    assert call.type == "function" and call.id.startswith("call"), call
    assert call.function.name == name, call
    return json.loads(call.function.arguments)


# A required call: the grammar makes the answer well-formed calls of offered tools (parallel
# calls are allowed; a call cut off by max_tokens is dropped, and the finish says `length`).
required = client.chat.completions.create(model=model, messages=asked, tools=[weather, clock], tool_choice="required", max_tokens=64, temperature=0)
choice = required.choices[0]
assert choice.finish_reason in ("tool_calls", "length"), required
assert len(choice.message.tool_calls) >= 1, required
for call in choice.message.tool_calls:
    assert call.function.name in ("get_weather", "get_time"), call
    check_call(call, call.function.name)
single = client.chat.completions.create(
    model=model, messages=asked, tools=[weather, clock], tool_choice="required", parallel_tool_calls=False, max_tokens=64, temperature=0
)
assert single.choices[0].finish_reason == "tool_calls" and len(single.choices[0].message.tool_calls) == 1, single

# A named tool: that one, with arguments of its schema.
named = client.chat.completions.create(
    model=model, messages=asked, tools=[weather, clock], tool_choice={"type": "function", "function": {"name": "get_weather"}},
    max_tokens=64, temperature=0,
)
assert named.choices[0].finish_reason == "tool_calls", named
[named_call] = named.choices[0].message.tool_calls
weather_arguments = check_call(named_call, "get_weather")
assert sorted(weather_arguments) == ["city", "unit"] and isinstance(weather_arguments["city"], str), weather_arguments
assert weather_arguments["unit"] in ("celsius", "fahrenheit"), weather_arguments

# The same, streamed: the call arrives whole in one delta, then the finish reason.
streamed_calls, finish = {}, None
for chunk in client.chat.completions.create(
    model=model, messages=asked, tools=[weather], tool_choice="required", parallel_tool_calls=False, max_tokens=64, temperature=0, stream=True,
):
    for delta_choice in chunk.choices:
        for delta in delta_choice.delta.tool_calls or []:
            entry = streamed_calls.setdefault(delta.index, {"name": "", "arguments": ""})
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
        finish = delta_choice.finish_reason or finish
assert finish == "tool_calls", finish
assert streamed_calls[0]["name"] == "get_weather" and "city" in json.loads(streamed_calls[0]["arguments"]), streamed_calls

# The call's result goes back to the model, which answers in text.
follow_up = asked + [
    {"role": "assistant", "content": None, "tool_calls": [named_call.model_dump(exclude_none=True)]},
    {"role": "tool", "tool_call_id": named_call.id, "content": json.dumps({"temperature": 18, "sky": "clear"})},
]
answered = client.chat.completions.create(model=model, messages=follow_up, tools=[weather], max_tokens=32, temperature=0)
assert answered.choices[0].message.content, answered
assert answered.choices[0].finish_reason in ("stop", "length", "tool_calls"), answered

# tool_choice none: the answer is text.
declined = client.chat.completions.create(model=model, messages=asked, tools=[weather], tool_choice="none", max_tokens=16, temperature=0)
assert declined.choices[0].message.tool_calls is None and declined.choices[0].message.content, declined

errors = {}
for name, extra in [
    ("unknown_tool", {"tools": [weather], "tool_choice": {"type": "function", "function": {"name": "launch"}}}),
    ("choice_without_tools", {"tool_choice": "required"}),
    ("bad_name", {"tools": [{"type": "function", "function": {"name": "no spaces"}}]}),
    ("unenforceable", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string", "pattern": "x"}}}], "tool_choice": "required"}),
]:
    try:
        client.chat.completions.create(model=model, messages=asked, max_tokens=8, **extra)
    except openai.BadRequestError as error:
        errors[name] = [error.status_code, error.param]
try:
    client.chat.completions.create(model="smollm2", messages=asked, tools=[weather], max_tokens=8)
except openai.BadRequestError as error:
    errors["template_without_tools"] = [error.status_code, error.param, error.message]
try:
    client.completions.create(model=model, prompt="x", max_tokens=8, extra_body={"tools": [weather]})
except openai.BadRequestError as error:
    errors["completions"] = [error.status_code, error.param]

print(json.dumps({"required": call.function.name, "named": weather_arguments, "answer": answered.choices[0].message.content, "errors": errors}))
