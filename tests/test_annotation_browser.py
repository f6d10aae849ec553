"""End to end in a real browser: a tiny run's answers exported, served, annotated in headless Chromium
(Debian's, driven by Playwright; no browser of Playwright's own) with the keyboard and one span selected
with the mouse, one item flagged as unclear, all kept across a reload, a stale save from a second tab
refused; then export-db and a run that trains on the exported file.

``LAFFI_CHROMIUM`` names another Chromium; ``LAFFI_SCREENSHOTS=DIR`` keeps the screenshots (the main
screen and the list)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .annotation_helpers import serve
from .conftest import TINY

pytestmark = pytest.mark.slow
playwright = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (the dev extra)")
CHROMIUM = os.environ.get("LAFFI_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on PATH: apt-get install chromium (or set LAFFI_CHROMIUM)"
)
# Headless as root on a closed network: without the background-networking flags Chromium waits on
# connections that never come. Playwright gives every launch a fresh profile (--user-data-dir).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
RATIO = "feedback.human_ratio=0.3"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    return done


def _word_box(page, word: str) -> dict:
    """Where ``word`` is drawn in the passage (a text node outside the answer's highlight)."""
    return page.evaluate(
        """(word) => {
            const walker = document.createTreeWalker(document.getElementById("passage"), NodeFilter.SHOW_TEXT);
            for (let node = walker.nextNode(); node; node = walker.nextNode()) {
                if (node.parentElement.tagName === "MARK") continue;
                const at = node.textContent.search(new RegExp(`\\\\b${word}\\\\b`));
                if (at < 0) continue;
                const range = document.createRange();
                range.setStart(node, at);
                range.setEnd(node, at + word.length);
                const box = range.getClientRects()[0];
                return { left: box.left, right: box.right, y: box.top + box.height / 2 };
            }
            return null;
        }""",
        word,
    )


def _pick_word(item: dict) -> str:
    """A word of the passage to select as the correction: letters only, not the model's answer."""
    for word in item["context"].split():
        if word.isalpha() and len(word) >= 5 and word not in item["prediction"]:
            return word
    raise AssertionError(f"no word to select in {item['context']!r}")


@needs_chromium
def test_annotate_in_chromium_then_train_on_the_export(tmp_path, cache_dir):
    from playwright.sync_api import expect, sync_playwright

    tiny = [*TINY, f"paths.cache_dir={cache_dir}", f"cache.dir={tmp_path / 'stages'}"]
    _run("-m", "laffi_exp.annotate", "export", "--out", str(tmp_path / "batch"), "--include-gold", RATIO, *tiny,
         f"paths.output_dir={tmp_path / 'export'}", cwd=tmp_path)  # fmt: skip
    batch = tmp_path / "batch.jsonl"
    items = [json.loads(line) for line in batch.read_text().splitlines()]
    ids = [item["id"] for item in items]
    assert len(ids) >= 6, "the tiny run gives humans too few examples for this test"
    word = _pick_word(items[3])
    shots = Path(os.environ.get("LAFFI_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)

    server, url = serve(batch, "--chunk", "50")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1100, "height": 900})
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(url)

            # Sign in and annotate three items with the keyboard alone.
            expect(page.locator("#annotator")).to_be_focused()
            page.keyboard.type("alice")
            page.keyboard.press("Enter")
            current = page.locator("#item-id")
            expect(current).to_have_text(ids[0])
            page.keyboard.press("1")  # the "correct" template, the caret after it
            page.keyboard.type(" The passage says so.")
            expect(page.locator("#feedback")).to_have_value("Correct. The passage says so.")
            page.keyboard.press("Control+Enter")  # save and next
            expect(current).to_have_text(ids[1])
            expect(page.locator("#message")).to_contain_text(f"Saved {ids[0]} (revision 1)")
            page.keyboard.press("3")  # no answer
            page.keyboard.press("Control+Enter")
            expect(current).to_have_text(ids[2])
            page.keyboard.press("2")  # incorrect: to the correction field
            expect(page.locator("#correction")).to_be_focused()
            page.keyboard.type("Nobody")
            page.keyboard.press("Enter")  # on to the feedback
            expect(page.locator("#feedback")).to_be_focused()
            page.keyboard.type(" It is not in the passage.")
            page.keyboard.press("Control+Enter")
            expect(current).to_have_text(ids[3])

            # A span of the passage, selected with the mouse, becomes the correction.
            box = _word_box(page, word)
            assert box, word
            page.mouse.move(box["left"] + 1, box["y"])
            page.mouse.down()
            page.mouse.move(box["right"] - 1, box["y"], steps=8)
            page.mouse.up()
            expect(page.locator("#correction")).to_have_value(word)
            expect(page.locator("#feedback")).to_have_value(f'Incorrect. The answer is "{word}".')
            page.screenshot(path=str(shots / "annotation_app.png"))
            page.keyboard.press("Control+Enter")
            expect(current).to_have_text(ids[4])
            expect(page.locator("#progress-text")).to_contain_text(f"4/{len(ids)} done")

            page.keyboard.press("u")  # unclear: flagged, skipped
            expect(current).to_have_text(ids[5])
            expect(page.locator("#progress-text")).to_contain_text(f"5/{len(ids)} done (1 flagged)")

            # A reload keeps everything: the same item, the saved texts, the list.
            page.reload()
            expect(current).to_have_text(ids[5])
            page.keyboard.press("k")
            expect(page.locator("#status")).to_have_text("flagged as unclear")
            page.keyboard.press("k")
            expect(current).to_have_text(ids[3])
            expect(page.locator("#correction")).to_have_value(word)
            expect(page.locator("#status")).to_have_text("saved (revision 1)")
            expect(page.locator("#reads-as")).to_contain_text(f"incorrect → “{word}”")
            page.keyboard.press("l")
            rows = page.locator("#list-body tr")
            expect(rows).to_have_count(len(ids))
            for i, status in enumerate(["saved"] * 4 + ["flagged", "open"]):
                expect(rows.nth(i).locator("td").nth(2)).to_have_text(status)
            page.screenshot(path=str(shots / "annotation_app_list.png"))
            rows.nth(0).click()  # back to the first item
            expect(current).to_have_text(ids[0])
            expect(page.locator("#feedback")).to_have_value("Correct. The passage says so.")

            # A second tab saves the same item; this tab's later save is refused, not silently lost.
            tab = context.new_page()
            tab.goto(f"{url}#item={ids[0]}")
            expect(tab.locator("#item-id")).to_have_text(ids[0])
            tab.keyboard.press("1")
            tab.keyboard.press("Control+s")
            expect(tab.locator("#message")).to_contain_text("revision 2")
            page.keyboard.press("3")
            page.keyboard.press("Control+s")
            expect(page.locator("#message")).to_contain_text("was saved elsewhere")
            page.get_by_role("button", name="Load the saved version (drop mine)").click()
            expect(page.locator("#feedback")).to_have_value("Correct.")
            assert errors == []
            browser.close()
    finally:
        os.kill(server.pid, signal.SIGKILL)  # everything was acknowledged, so everything is on disk
        server.wait(timeout=30)

    # export-db, checked against the run as feedback.human.path checks it; then the run trains on it.
    human = tmp_path / "human.jsonl"
    on_missing = "feedback.human.on_missing=synthetic"  # the items nobody annotated take synthetic feedback
    checked = _run("-m", "laffi_exp.annotate", "export-db", "--db", str(tmp_path / "batch.annotations.sqlite"),
                   "--out", str(human), "--check", RATIO, on_missing, *tiny, f"paths.output_dir={tmp_path / 'check'}",
                   cwd=tmp_path)  # fmt: skip
    assert f"4 used; 0 stale and {len(ids) - 4} missing fall back to synthetic feedback" in checked.stdout
    rows = {r["id"]: r for r in map(json.loads, human.read_text().splitlines())}
    expected = {
        ids[0]: "Correct.",  # the second tab's save
        ids[1]: "Incorrect. The question cannot be answered from the passage, so there is no answer.",
        ids[2]: 'Incorrect. The answer is "Nobody". It is not in the passage.',
        ids[3]: f'Incorrect. The answer is "{word}".',
    }
    assert {i: r["feedback"] for i, r in rows.items()} == expected
    assert all(r["annotator_id"] == "alice" for r in rows.values()) and sum(r["seconds"] for r in rows.values()) > 0
    report = json.loads((tmp_path / "annotation_report.json").read_text())
    assert (report["coverage"]["annotated"], report["coverage"]["flagged"], report["time"]["count"]) == (4, 1, 4)

    run_dir = tmp_path / "run"
    _run("-m", "laffi_exp", RATIO, "feedback/human=file", f"feedback.human.path={human}", on_missing, *tiny,
         f"hydra.run.dir={run_dir}", cwd=tmp_path)  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["feedback/human_fallback"] == len(ids) - 4
    trained = [json.loads(line) for name in ("feedback.jsonl", "val_feedback.jsonl") for line in
               (run_dir / name).read_text().splitlines()]  # fmt: skip
    from_people = {f["id"]: f for f in trained if f["source"] == "human"}
    assert {i: f["feedback"] for i, f in from_people.items()} == expected
    assert {f["annotator"] for f in from_people.values()} == {"alice"}
    assert from_people[ids[3]]["verdict"] == "incorrect" and from_people[ids[3]]["correction"] == word
    assert json.loads((run_dir / "feedback_report.json").read_text())["human_time"]["count"] == 4
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
