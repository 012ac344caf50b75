"""FlexInference: the official Python SDK of the deadline-aware inference router.

from flexinference import FlexInference, output_text

client = FlexInference(api_key="flex_live_...")
res = client.responses.create({
    "model": "gpt-5.5",
    "input": "Write a haiku about cheap GPUs.",
    "start_within": "00h-00m-30s",
})
print(output_text(res))
"""

from ._client import DEFAULT_BASE_URL, DEFAULT_TIMEOUT, AsyncFlexInference, FlexInference
from ._errors import FlexInferenceError, PaymentRequiredError
from ._response import Outcome, RawResponse
from ._streaming import AsyncStream, Stream
from ._text import interaction_output_text, message_output_text, output_text
from ._version import __version__

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_TIMEOUT",
    "AsyncFlexInference",
    "AsyncStream",
    "FlexInference",
    "FlexInferenceError",
    "Outcome",
    "PaymentRequiredError",
    "RawResponse",
    "Stream",
    "__version__",
    "interaction_output_text",
    "message_output_text",
    "output_text",
]
