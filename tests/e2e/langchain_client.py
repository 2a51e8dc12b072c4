"""Drives a tensorlet node's `openai` app with LangChain's OpenAI chat model (langchain-openai),
a second real client beside the official one.

Run by tests/e2e/llm.rs: python3 langchain_client.py BASE_URL CA_CERT MODEL, where MODEL's chat
template offers tools. Prints one JSON object with what it saw; any failed expectation raises.
"""
import json
import sys

import httpx
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

base_url, ca_cert, model = sys.argv[1:4]
chat = ChatOpenAI(
    model=model, base_url=base_url, api_key="unused", temperature=0, max_tokens=24, max_retries=0,
    http_client=httpx.Client(verify=ca_cert),
)
question = [HumanMessage("What is the capital of France? Answer in one word.")]

answer = chat.invoke(question)
assert answer.content, answer
assert answer.response_metadata["finish_reason"] in ("stop", "length"), answer.response_metadata
assert answer.usage_metadata["output_tokens"] > 0, answer.usage_metadata
streamed = "".join(chunk.content for chunk in chat.stream(question))
assert streamed == answer.content, (streamed, answer.content)


class City(BaseModel):
    """A city and whether it is its country's capital."""

    name: str
    capital: bool


structured = chat.with_structured_output(City, method="json_schema").invoke("Describe Paris as JSON.")
assert isinstance(structured, City), structured


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return "sunny"


caller = chat.model_copy(update={"max_tokens": 64})
called = caller.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
assert len(called.tool_calls) == 1, called
[call] = called.tool_calls
assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str), called.tool_calls

print(json.dumps({"answer": answer.content, "city": structured.model_dump(), "call": call["args"]}))
