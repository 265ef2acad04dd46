"""Fetch a document, summarize it section by section, and report progress as it goes.

Needs an application "docs" with a "summarize" intent, and the document's
host reachable by the workers (public, or listed in FLOWPOOL_EGRESS_ALLOW).
"""
from flowpool_workflow import HttpError, WorkflowContext

APPLICATION = "docs"
INPUT_SCHEMA = {
    "url": {"type": "string", "description": "Where the document is (plain text, paragraphs apart)", "required": True},
    "max_sections": {"type": "integer", "description": "Summarize at most this many sections"},
}
OUTPUT_SCHEMA = {"url": {"type": "string"}, "sections": {"type": "array"}, "summary": {"type": "string"}}
TIMEOUT_SECONDS = 120


def split_sections(text, limit):
    """Paragraphs of the text, blank lines apart, at most ``limit`` of them."""
    sections = [part.strip() for part in text.split("\n\n") if part.strip()]
    return sections[:limit]


def summarize(ctx, text):
    response = ctx.chat.completions.create(
        intent="summarize", messages=[{"role": "system", "content": "Summarize in one sentence."},
                                      {"role": "user", "content": text}])
    return response["choices"][0]["message"]["content"]


def execute(ctx: WorkflowContext):
    url = ctx.input["url"]
    try:
        page = ctx.http.get(url, timeout=20)
        page.raise_for_status()
    except HttpError as exc:
        raise RuntimeError(f"could not fetch {url}: {exc}") from exc
    sections = split_sections(page.text, ctx.input.get("max_sections") or 20)
    ctx.log.info("fetched", url=url, sections=len(sections), bytes=len(page.content))
    summaries = []
    for index, section in enumerate(sections):
        summaries.append(summarize(ctx, section))
        ctx.emit("progress", {"section": index + 1, "of": len(sections)})
    return {"url": url, "sections": summaries, "summary": " ".join(summaries)}
