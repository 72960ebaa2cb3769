"""The answer the built-in endpoint composes, from what a request shows: the user's text and
what it can really see of each image or video part (an inlined image's format, size and main
colours with Pillow; for URLs only the URL, or with `fetch_images` the bytes fetched from it and
their sha256), a reasoning text (in a
`<think>` block or in `reasoning_field`), a JSON object built from a labeling request's schema,
and the chat.completion around it with its usage (and usage details: `_usage`). Faults that change the answer itself
(`length`, `nochoices`, `invalid_json`, `answer_echoes_key`) are applied here.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import zlib
import time
from typing import Any, NamedTuple

from ...config.serve import ServeOptions
from .audio import Audio

__all__ = ["completion", "user_parts", "describe_image", "describe_video", "Video", "Fetched", "Media"]


def completion(body: dict[str, Any], prompt: str, urls: list[Media], opts: ServeOptions, *,
               fault: str | None, number: int, authorization: str) -> dict[str, Any]:
    """The chat.completion answering `body` (request number `number`), in the seed's shape."""
    answer = _json_answer(body, prompt, opts, valid=fault != "invalid_json")
    answer = next((text for needle, text in opts.row_answers.items() if needle in prompt), answer)
    if fault == "answer_echoes_key":  # a model that repeats what it was sent, headers included
        answer = f"Answer to {prompt!r}: your request said Authorization: {authorization}"
    content, reasoning = _compose(prompt, urls, opts, length_cut=fault == "length", answer=answer)
    message: dict[str, Any] = {"content": content, "refusal": None, "role": "assistant", "annotations": None,
                               "audio": None, "function_call": None, "tool_calls": None}
    if opts.reasoning_field != "content":
        message[opts.reasoning_field] = reasoning
    return {
        "id": f"chatcmpl-{number}",
        "choices": [] if fault == "nochoices" else [
            {"finish_reason": "length" if fault == "length" else "stop", "index": 0, "logprobs": None, "message": message}
        ],
        "created": int(time.time()),
        "model": opts.model or body["model"],
        "object": "chat.completion",
        "service_tier": None,
        "system_fingerprint": None,
        "usage": _usage(body, prompt, urls, content, reasoning, opts, fault),
    }


def _usage(body: dict[str, Any], prompt: str, urls: list[Media], content: str, reasoning: str,
           opts: ServeOptions, fault: str | None) -> dict[str, Any]:
    """Tokens estimated at four characters each (85 per image or video, 10 per second of audio); a
    `length` cut used all of max_tokens. The details (unless `usage_details` is off): `image_tokens`
    85 per image, `audio_tokens` (when there is audio), `cached_tokens` the fixed
    `cached_prompt_tokens` (at most the prompt), `reasoning_tokens` the reasoning text's (at most the
    completion): deterministic, so tests can compute every figure."""
    audio = sum(u.tokens() for u in urls if isinstance(u, Audio))
    prompt_tokens = len(prompt) // 4 + 8 + 85 * sum(1 for u in urls if not isinstance(u, Audio)) + audio
    completion_tokens = max(1, (len(content) + len(reasoning if opts.reasoning_field != "content" else "")) // 4)
    max_tokens = body.get("max_tokens")
    if fault == "length" and isinstance(max_tokens, int):
        completion_tokens = max_tokens
    usage: dict[str, Any] = {
        "completion_tokens": completion_tokens,
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens_details": None,
        "prompt_tokens_details": None,
    }
    if opts.usage_details:
        images = sum(1 for u in urls if not isinstance(u, (Video, Audio)))
        usage["prompt_tokens_details"] = {"cached_tokens": min(opts.cached_prompt_tokens, prompt_tokens),
                                          "image_tokens": 85 * images,
                                          **({"audio_tokens": audio} if any(isinstance(u, Audio) for u in urls) else {})}
        usage["completion_tokens_details"] = {"reasoning_tokens": min(len(reasoning) // 4, completion_tokens)}
    return usage


def user_parts(messages: list[dict[str, Any]]) -> tuple[str, list[Media]]:
    """The user messages' text, joined, and their image URLs, video and audio parts in order."""
    texts: list[str] = []
    urls: list[Media] = []
    for m in messages:
        if m.get("role") != "user":
            continue
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif part.get("type") == "image_url":
                urls.append((part.get("image_url") or {}).get("url", ""))
            elif part.get("type") == "video_url":
                urls.append(Video((part.get("video_url") or {}).get("url", "")))
            elif part.get("type") == "video":
                urls.append(Video([str(f) for f in part.get("video") or []]))
            elif (clip := Audio.of_part(part)) is not None:
                urls.append(clip)
    return "\n".join(texts), urls


def describe_image(url: str, analyze: bool) -> str:
    """What the endpoint can say of an image: with `analyze`, an inlined one is opened (Pillow)."""
    if not url.startswith("data:"):
        return f"an image at {url[:200]} (not fetched: the built-in endpoint has no network)"
    head, _, payload = url.partition(",")
    mime = head[5:].split(";")[0] or "unknown type"
    if not analyze:
        return f"an inlined {mime} image of {len(payload) * 3 // 4} bytes"
    try:
        from PIL import Image

        img = Image.open(io.BytesIO(base64.b64decode(payload)))
        w, h = img.size
        small = img.convert("RGB").resize((24, 24))
        colours = small.quantize(colors=3).convert("RGB").getcolors(24 * 24) or []
        top = ", ".join("#%02x%02x%02x" % c for _, c in sorted(colours, reverse=True)[:3])
        return f"a {img.format or mime} image, {w}x{h} pixels, main colours {top}"
    except Exception as exc:  # a broken image is an answer too: say so, as a model would
        return f"an inlined {mime} that could not be decoded ({type(exc).__name__})"


class Fetched(NamedTuple):
    """An image URL the endpoint fetched (`fetch_images`): what came back."""

    data: bytes


def describe_fetched(image: Fetched, analyze: bool) -> str:
    digest = hashlib.sha256(image.data).hexdigest()[:16]
    inlined = "data:image/unknown;base64," + base64.b64encode(image.data).decode()
    return f"fetched ({len(image.data)} bytes, sha256 {digest}): " + describe_image(inlined, analyze)


class Video(NamedTuple):
    """A video part: a URL or data URI (`video_url`), or a list of frames (DashScope's `video`)."""

    value: str | list[str]


Media = str | Video | Fetched | Audio  # an image URL, a video part, a fetched image, an audio part


def describe_video(video: Video, analyze: bool) -> str:
    """What the endpoint can say of a video: its kind and size (vLLM's JPEG frames: the first one)."""
    v = video.value
    if isinstance(v, list):
        return f"a video of {len(v)} frames given one by one"
    if not v.startswith("data:"):
        return f"a video at {v[:200]} (not fetched: the built-in endpoint has no network)"
    head, _, payload = v.partition(",")
    mime = head[5:].split(";")[0] or "unknown type"
    if mime == "video/jpeg":  # vLLM's frames, base64 JPEGs joined by commas
        frames = payload.split(",")
        first = describe_image("data:image/jpeg;base64," + frames[0], analyze) if analyze else "not analysed"
        return f"a video of {len(frames)} JPEG frames (the first: {first})"
    return f"an inlined {mime} video of {len(payload) * 3 // 4} bytes"


def _describe(media: Media, analyze: bool) -> str:
    if isinstance(media, Video):
        return describe_video(media, analyze)
    if isinstance(media, Fetched):
        return describe_fetched(media, analyze)
    if isinstance(media, Audio):
        return media.heard()[0]
    return describe_image(media, analyze)


def _compose(
    prompt: str, urls: list[Media], opts: ServeOptions, *, length_cut: bool, answer: str | None = None
) -> tuple[str, str]:
    """(content, reasoning): the answer given, or one describing each part; cut in the middle of
    thinking for `length_cut`."""
    seen = [_describe(u, opts.analyze_images) for u in urls]
    reasoning = f"The user asks: {prompt!r}. I am shown {len(urls)} image(s); I describe each briefly."
    if length_cut:
        content = f"<think>\n{reasoning} Let me look more closely at" if opts.reasoning_field == "content" else ""
        return content, reasoning
    if answer is None:
        answer = f"Answer to {prompt!r}: " + ("; ".join(f"image {i + 1} is {d}" for i, d in enumerate(seen)) or "no image given") + "."
    if opts.answer_bytes and len(answer.encode()) < opts.answer_bytes:
        answer += " " + "x" * (opts.answer_bytes - len(answer.encode()) - 1)
    if opts.reasoning_field == "content":
        return f"<think>\n{reasoning}\n</think>\n\n{answer}", reasoning
    return answer, reasoning


def _json_answer(body: dict[str, Any], prompt: str, opts: ServeOptions, *, valid: bool) -> str | None:
    """For a labeling request (response_format json_schema): a JSON answer built from its schema."""
    rf = body.get("response_format")
    if not isinstance(rf, dict) or rf.get("type") != "json_schema":
        return None
    from ...rows.labels import (
        example_for_schema,  # here: the server starts without pyarrow and jsonschema
    )

    schema = (rf.get("json_schema") or {}).get("schema")
    seed = zlib.crc32(prompt.encode()) if opts.vary_labels else None
    text = json.dumps(example_for_schema(schema, valid=valid, text=f"about {prompt[:60]}", seed=seed), ensure_ascii=False)
    return f"```json\n{text}\n```" if opts.fence_json else text
