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

print(json.dumps({"answer": answer, "chunks": len(deltas), "finish": finish, "completion": completion.choices[0].text, "errors": errors}))
