"""Asks a tensorlet node's `openai` app for embeddings with the official OpenAI Python client.

Run by tests/e2e/embeddings.rs: python3 openai_embeddings.py BASE_URL CA_CERT MODEL. Prints one
JSON object with the vectors (float and base64 answers) and the errors it saw.
"""
import json
import sys

import openai

base_url, ca_cert, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key="unused", http_client=openai.DefaultHttpxClient(verify=ca_cert), max_retries=0)

texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
# The client asks for base64 unless told otherwise and decodes it itself.
default = client.embeddings.create(model=model, input=texts)
floats = client.embeddings.create(model=model, input=texts, encoding_format="float")
single = client.embeddings.create(model=model, input=texts[2], encoding_format="float")
assert [d.index for d in default.data] == [0, 1, 2], default

errors = {}
try:
    client.embeddings.create(model="no-such-model", input="x")
except openai.NotFoundError as error:
    errors["unknown_model"] = [error.status_code, error.code]
try:
    client.embeddings.create(model=model, input=[])
except openai.BadRequestError as error:
    errors["empty"] = [error.status_code, error.message]

# `user` is accepted; `dimensions` (which would truncate) and undocumented fields are refused by name.
assert client.embeddings.create(model=model, input="x", user="someone", encoding_format="float").data
for name, extra in [("dimensions", {"dimensions": 8}), ("bogus", {"extra_body": {"bogus": 1}})]:
    try:
        client.embeddings.create(model=model, input="x", **extra)
    except openai.BadRequestError as error:
        errors[name] = [error.status_code, error.param]

print(json.dumps({
    "base64": [d.embedding for d in default.data],
    "float": [d.embedding for d in floats.data],
    "single": single.data[0].embedding,
    "usage": [floats.usage.prompt_tokens, floats.usage.total_tokens],
    "model": floats.model,
    "errors": errors,
}))
