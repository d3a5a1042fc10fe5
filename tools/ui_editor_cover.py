"""Pages closed while their example loads, each followed by a new page that loads the example and brushes: the
brushed mask should reach the server every time. Before the editors' upload events showed no progress, about one
new page in 27 kept a "processing" cover over its editor for good and its strokes were lost (see ui/app.py). Too
slow and too random for CI (each round about 10 s); run it by hand after changing the page's events:

    HF_HUB_OFFLINE=1 python tools/ui_editor_cover.py [ROUNDS] [SEED]

Needs the [test,ui] extras and Debian's chromium. Prints each round and the number of rounds whose strokes were
lost; exit 1 if any was (a screenshot of each: /tmp/dragondiff-cover-ROUND.png).
"""

import random
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))


def main() -> int:
    import pytest
    from playwright.sync_api import sync_playwright

    import browser as B

    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    random.seed(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    server = B.start_server(Path("/tmp/dragondiff-cover-server.log"))
    lost = 0
    try:
        with sync_playwright() as p:
            chromium = p.chromium.launch(executable_path=B.CHROMIUM, args=B.CHROMIUM_ARGS, headless=True)
            for k in range(rounds):
                page = B._open(chromium, server.url)
                page.click("#move-load")
                page.wait_for_timeout(random.uniform(0, 3000))
                page.close()
                page = B._open(chromium, server.url)
                B.load_example(page, "move")
                try:
                    B.paint(page, "move-editor", 16, 40, 64, 88, tries=1)
                    print(f"{k}: mask reached the server", flush=True)
                except pytest.fail.Exception as e:
                    lost += 1
                    page.screenshot(path=f"/tmp/dragondiff-cover-{k}.png", full_page=True)
                    print(f"{k}: LOST: {str(e)[:160]}", flush=True)
                page.close()
            chromium.close()
    finally:
        server.stop()
    print(f"{lost} of {rounds} rounds lost their strokes")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
