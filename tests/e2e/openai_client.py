"""Drives a tensorlet node's `openai` app with the official OpenAI Python client.

Run by tests/e2e/llm.rs: python3 openai_client.py BASE_URL CA_CERT MODEL. Prints one JSON
object with what it saw; any failed expectation raises (non-zero exit).
"""
import json
import sys

import openai

base_url, ca_cert, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key="unused", http_client=openai.DefaultHttpxClient(verify=ca_cert), max_retries=0)

listed = [m.id for m in client.models.list().data]
assert model in listed, listed

messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
whole = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
assert whole.object == "chat.completion"
answer = whole.choices[0].message.content
assert answer, whole
assert whole.usage.prompt_tokens > 0 and 0 < whole.usage.completion_tokens <= 24, whole.usage

stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
)
deltas, finish, usage = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            deltas.append(choice.delta.content)
        finish = choice.finish_reason or finish
assert "".join(deltas) == answer, (deltas, answer)
assert len(deltas) > 1, deltas
assert finish in ("stop", "length"), finish
assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage

completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
assert completion.choices[0].text, completion

errors = {}
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
except openai.NotFoundError as error:
    errors["unknown_model"] = [error.status_code, error.code]
try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=0)
except openai.BadRequestError as error:
    errors["max_tokens"] = [error.status_code, error.param]
try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 5000}], max_tokens=8)
except openai.BadRequestError as error:
    errors["too_long"] = [error.status_code, error.message]

# n choices, whole and streamed.
two = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0.8, seed=7, n=2)
assert [choice.index for choice in two.choices] == [0, 1], two
assert all(choice.message.content for choice in two.choices), two
streamed = {}
for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, n=2, stream=True):
    for choice in chunk.choices:
        streamed.setdefault(choice.index, []).append(choice.delta.content or "")
assert sorted(streamed) == [0, 1], streamed
assert "".join(streamed[0]) == "".join(streamed[1]), streamed  # greedy: the same text twice

# Both token limits at once: the current name wins.
count = [{"role": "user", "content": "Count from one to fifty in words."}]
both = client.chat.completions.create(model=model, messages=count, temperature=0, max_tokens=40, max_completion_tokens=3)
assert 0 < both.usage.completion_tokens <= 3, both.usage

# Fields asking for the default, and honoured extras, are accepted.
accepted = client.chat.completions.create(
    model=model, messages=messages, max_tokens=4, temperature=0, presence_penalty=0, logprobs=False,
    response_format={"type": "text"}, user="someone", extra_body={"top_k": 1, "repetition_penalty": 1.1},
)
assert accepted.choices[0].message.content, accepted

# JSON mode: the answer is one JSON object (the grammar lets the model write nothing else).
asked = [{"role": "user", "content": "What is the capital of France? Answer with a JSON object."}]
structured = client.chat.completions.create(
    model=model, messages=asked, max_tokens=64, temperature=0, response_format={"type": "json_object"}
)
assert structured.choices[0].finish_reason == "stop", structured
parsed = json.loads(structured.choices[0].message.content)
assert isinstance(parsed, dict), parsed

# Structured output: the answer validates against the schema asked for.
city = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"enum": ["France", "Germany"]}, "capital": {"type": "boolean"}},
    "required": ["city", "country", "capital"],
    "additionalProperties": False,
}
shaped = client.chat.completions.create(
    model=model, messages=asked, max_tokens=64, temperature=0,
    response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": city, "strict": True}},
)
assert shaped.choices[0].finish_reason == "stop", shaped
fields = json.loads(shaped.choices[0].message.content)
assert sorted(fields) == ["capital", "city", "country"], fields
assert isinstance(fields["city"], str) and fields["country"] in ("France", "Germany") and isinstance(fields["capital"], bool), fields

# Log-probabilities: greedy decoding takes the likeliest token, so each token is its own first
# alternative; the tokens' bytes are the answer, streamed or whole.
probed = client.chat.completions.create(model=model, messages=count, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
content = probed.choices[0].logprobs.content
assert len(content) == probed.usage.completion_tokens, (content, probed.usage)
for entry in content:
    alternatives = [t.logprob for t in entry.top_logprobs]
    assert entry.logprob <= 0 and len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True), entry
    assert entry.top_logprobs[0].token == entry.token and abs(alternatives[0] - entry.logprob) < 1e-5, entry
assert bytes(b for entry in content for b in entry.bytes).decode() == probed.choices[0].message.content, content
streamed_tokens = []
for chunk in client.chat.completions.create(model=model, messages=count, max_tokens=10, temperature=0, logprobs=True, stream=True):
    for choice in chunk.choices:
        if choice.logprobs and choice.logprobs.content:
            streamed_tokens += [entry.token for entry in choice.logprobs.content]
assert streamed_tokens == [entry.token for entry in content], (streamed_tokens, content)
prompt = "The capital of France is"
legacy = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
lp = legacy.choices[0].logprobs
assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == legacy.usage.completion_tokens, lp
assert "".join(lp.tokens) == legacy.choices[0].text and lp.text_offset[0] == len(prompt), lp
assert all(1 <= len(top) <= 2 and max(top.values()) >= logprob for top, logprob in zip(lp.top_logprobs, lp.token_logprobs)), lp

# logit_bias 100 forces a token at every step; echo starts the text with the prompt.
forced = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, logit_bias={"28": 100}, logprobs=0)
forced_tokens = forced.choices[0].logprobs.tokens
assert len(forced_tokens) == 6 and len(set(forced_tokens)) == 1, forced_tokens
echoed = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0, echo=True)
assert echoed.choices[0].text == prompt + legacy.choices[0].text, (echoed, legacy)

# min_p 1 keeps only the likeliest token: any temperature and seed decode greedily.
greedy = client.chat.completions.create(model=model, messages=count, max_tokens=12, temperature=0).choices[0].message.content
for seed in (1, 2):
    hot = client.chat.completions.create(model=model, messages=count, max_tokens=12, temperature=1.5, seed=seed, extra_body={"min_p": 1.0})
    assert hot.choices[0].message.content == greedy, (hot, greedy)
# Presence and frequency penalties steer a greedy continuation off the comma it repeats.
repetitive = "1, 2, 3, 4, 5, 6, 7, 8,"
plain = client.completions.create(model=model, prompt=repetitive, max_tokens=12, temperature=0).choices[0].text
penalised = client.completions.create(
    model=model, prompt=repetitive, max_tokens=12, temperature=0, frequency_penalty=2.0, presence_penalty=1.0
).choices[0].text
assert plain.count(",") > penalised.count(","), (plain, penalised)

# Every other field is refused by name, never ignored.
refused = {}
for name, extra in [
    ("logit_bias", {"logit_bias": {"99999999": 5}}),
    ("top_logprobs", {"top_logprobs": 21, "logprobs": True}),
    ("presence_penalty", {"presence_penalty": 2.5}),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}),
    ("response_format", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "^a"}}}}),
    ("n", {"n": 9}),
    ("bogus", {"extra_body": {"bogus": 1}}),
]:
    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=4, **extra)
    except openai.BadRequestError as error:
        refused[name] = error.param

print(json.dumps({"answer": answer, "chunks": len(deltas), "finish": finish, "completion": completion.choices[0].text, "errors": errors, "refused": refused, "json": parsed}))
