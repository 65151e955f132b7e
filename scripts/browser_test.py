#!/usr/bin/env python3
"""Drives the page of `pipeline serve` in headless Chromium with the keyboard only (selenium;
run through scripts/browser_test.sh, which installs what it needs)."""

import argparse
import base64
import os
import subprocess
import sys
import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

TIMEOUT_S = 180


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        raise SystemExit(1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--binary", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    server = subprocess.Popen(
        [a.binary, "serve", "--model", a.model, "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE, text=True)
    driver = None
    try:
        line = server.stdout.readline()
        check(line.startswith("serving http://"), f"server started: {line.strip()}")
        url = line.split()[1]
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        driver.get(url)
        wait = WebDriverWait(driver, TIMEOUT_S)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#class option")) > 1)
        classes = [o.text for o in driver.find_elements(By.CSS_SELECTOR, "#class option")][1:]
        check("cat" in classes, f"the class picker is filled from /api/model: {classes}")

        # Keyboard only: the prompt has the focus; type "cat" and press Enter.
        active = driver.switch_to.active_element
        check(active.get_attribute("id") == "prompt", "the prompt has the focus on load")
        active.send_keys("cat")
        active.send_keys(Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grid figure img"))
        imgs = driver.find_elements(By.CSS_SELECTOR, "#grid figure img")
        n = int(driver.find_element(By.ID, "n").get_attribute("value"))
        check(len(imgs) == n, f"the grid shows {len(imgs)} images (n = {n})")
        png = base64.b64decode(imgs[0].get_attribute("src").split(",", 1)[1])
        check(b"tEXtparameters" in png, "each image is a PNG with its settings chunk")
        status = driver.find_element(By.ID, "status").text
        check(status.startswith("Done"), f"status: {status}")
        check("cat" in driver.find_element(By.ID, "results-line").text, "the result says cat")
        seed = driver.find_element(By.ID, "results-line").text.split("seed ")[1].split(" ")[0]
        progress = driver.find_element(By.ID, "progress")
        check(progress.get_attribute("value") == progress.get_attribute("max"), "progress bar full")

        # Tab to the first image and open it with Enter; Escape closes it.
        driver.find_element(By.CSS_SELECTOR, "#grid .enlarge").send_keys(Keys.ENTER)
        time.sleep(0.3)
        check(driver.find_element(By.ID, "viewer").get_attribute("open") is not None,
              "Enter on an image enlarges it")
        driver.switch_to.active_element.send_keys(Keys.ESCAPE)
        time.sleep(0.3)
        check(driver.find_element(By.ID, "viewer").get_attribute("open") is None, "Escape closes it")
        link = driver.find_element(By.CSS_SELECTOR, "#grid figcaption a")
        check(link.get_attribute("download").endswith(".png"), "each image has a download link")

        # Reuse settings sends them back to the form (the seed the server drew included).
        reuse = driver.find_element(By.XPATH, "//figcaption/button[text()='Reuse settings']")
        reuse.send_keys(Keys.ENTER)
        check(driver.find_element(By.ID, "seed").get_attribute("value") == seed,
              f"reuse settings restored seed {seed}")
        # A second generation with the random-seed button and a guidance rescale of 0.7 set
        # with the arrow keys (14 steps of 0.05), then Enter from the steps slider.
        driver.find_element(By.ID, "random-seed").send_keys(Keys.ENTER)
        rescale = driver.find_element(By.ID, "guidance_rescale")
        for _ in range(14):
            rescale.send_keys(Keys.ARROW_RIGHT)
        check(driver.find_element(By.ID, "guidance_rescale-out").text == "0.7",
              "the arrow keys move the guidance rescale slider to 0.7")
        # Typing a letter on a focused select picks the first option starting with it.
        driver.find_element(By.ID, "sampler").send_keys("u")
        driver.find_element(By.ID, "spacing").send_keys("k")
        picked = (driver.find_element(By.ID, "sampler").get_attribute("value"),
                  driver.find_element(By.ID, "spacing").get_attribute("value"))
        check(picked == ("unipc", "karras"), f"the keyboard picks UniPC on Karras timesteps: {picked}")
        check(not driver.find_element(By.ID, "trajectory-figure").is_displayed(),
              "no trajectory unless asked for")
        driver.find_element(By.ID, "trajectory").send_keys(Keys.SPACE)
        check(driver.find_element(By.ID, "trajectory").is_selected(),
              "Space ticks 'Show how the images form'")
        steps = driver.find_element(By.ID, "steps")
        steps.send_keys(Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history li")) == 2)
        wait.until(lambda d: d.find_element(By.ID, "generate").is_enabled())
        check(True, "Enter on a slider generates; the history holds both generations")
        line = driver.find_element(By.ID, "results-line").text
        check("(rescale 0.7)" in line and "unipc" in line and "(karras)" in line,
              f"the second generation is rescaled, UniPC on Karras timesteps: {line}")
        caption = driver.find_element(By.ID, "trajectory-caption").text
        check(driver.find_element(By.ID, "trajectory-img").is_displayed()
              and caption.startswith("How they formed") and "after steps 1, " in caption,
              f"the trajectory is shown: {caption}")
        driver.execute_script("document.activeElement.blur()")
        driver.save_screenshot(a.out)
        print(f"screenshot: {a.out}")

        # Image to image: upload the first result as the init image and generate from it.
        init = os.path.join(tempfile.mkdtemp(), "init.png")
        with open(init, "wb") as f:
            f.write(png)
        driver.find_element(By.ID, "init_image").send_keys(init)
        time.sleep(1)
        driver.find_element(By.ID, "prompt").send_keys(Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history li")) == 3)
        line = driver.find_element(By.ID, "results-line").text
        check("from an image at strength 0.6" in line, f"img2img from an upload: {line}")
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
