"""The README's two MLflow UI screenshots of a sweep: the runs table (the parent expanded, a few metric columns)
and the chart view of ``zeroshot/scenes`` against images seen, grouped by objective (seeds as a band).

Not part of the kit: run by hand against a served store, with Playwright and Debian's Chromium::

    apt-get install -y chromium && python3 -m pip install --target /tmp/pw playwright
    .venv/bin/python -m mlflow server --backend-store-uri sqlite:///$PWD/mlflow.db --host 127.0.0.1 --port 5077 &
    PYTHONPATH=/tmp/pw python3 docs/sweep_screenshots.py http://127.0.0.1:5077 EXPERIMENT_ID docs

Clicks by place where MLflow 3.17's UI offers no label (the chart-view toggle, the pane divider).
"""

import sys
import tempfile
import time

from playwright.sync_api import sync_playwright

METRICS = ["zeroshot/scenes/top1", "zeroshot/novel_pairs/top1", "retrieval/scenes/image_to_text_r1",
           "throughput/train_images_per_second"]


def main(base: str, experiment_id: str, out: str) -> None:
    raw = tempfile.mkdtemp()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1600, "height": 760})
        page.goto(f"{base}/#/experiments/{experiment_id}/runs", wait_until="load")
        page.wait_for_selector("text=sweep ", timeout=60000)
        time.sleep(2)
        page.get_by_text("Model training", exact=True).click()
        close = page.get_by_role("button", name="Close")  # the assistant's panel
        if close.count():
            close.first.click()
        page.get_by_text("Columns", exact=True).first.click()
        search = page.get_by_placeholder("Search columns")
        for name in ["Dataset", "Models", "Source", *METRICS, "clipkit.text_tower"]:  # toggles each column
            search.fill(name)
            time.sleep(0.8)
            page.get_by_text(name, exact=True).last.click()
        page.keyboard.press("Escape")
        page.locator(".ag-row", has_text="sweep ").locator("button").first.click()  # expand the parent
        time.sleep(2)
        header = page.locator(".ag-header-cell", has_text="Run Name").first.bounding_box()
        middle = header["y"] + header["height"] / 2
        page.mouse.move(header["x"] + header["width"] - 2, middle)
        page.mouse.down()
        page.mouse.move(header["x"] + 470, middle, steps=10)
        page.mouse.up()
        time.sleep(1)
        page.screenshot(path=f"{raw}/table.png")
        page.get_by_text("Group by", exact=True).first.click()  # one line per objective, its seeds as a band
        time.sleep(1)
        page.keyboard.type("clipkit.objective")
        time.sleep(1)
        page.get_by_text("clipkit.objective", exact=True).last.click()
        page.keyboard.press("Escape")
        time.sleep(1)
        page.mouse.click(296, 119)  # the chart view
        time.sleep(4)
        page.get_by_placeholder("Search metric charts").fill("zeroshot/scenes")
        time.sleep(3)
        page.mouse.move(518, 500)  # widen the run list
        page.mouse.down()
        page.mouse.move(760, 500, steps=10)
        page.mouse.up()
        page.mouse.move(1450, 720)
        time.sleep(3)
        page.screenshot(path=f"{raw}/charts.png")
        browser.close()
    from PIL import Image  # crop away the sidebar and the empty table area

    Image.open(f"{raw}/table.png").crop((195, 0, 1600, 425)).save(f"{out}/sweep_runs_table.png", optimize=True)
    Image.open(f"{raw}/charts.png").crop((195, 0, 1600, 660)).save(f"{out}/sweep_charts.png", optimize=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
