// Loads cairn's status page in headless Chromium while a run is in progress and
// waits until the page (updated by its own script from the events stream, never
// reloaded) shows the run COMPLETE. Prints what the DOM shows of the run's steps
// as one JSON line; writes a screenshot.
//   node status-page.cjs URL RUN_ID SCREENSHOT SNAPSHOT
// Environment: CAIRN_TEST_PLAYWRIGHT (the playwright-core package dir),
// CAIRN_TEST_CHROMIUM (the browser).
'use strict';
const { chromium } = require(process.env.CAIRN_TEST_PLAYWRIGHT);
const [url, runId, shot, snapshot] = process.argv.slice(2);

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CAIRN_TEST_CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    let loads = 0;
    page.on('load', () => { loads += 1; });
    await page.goto(url);
    const initial = await page.$eval('#run-' + runId, (b) => b.dataset.status).catch(() => 'absent');
    await page.waitForFunction(
      (id) => { const b = document.getElementById('run-' + id); return b && b.dataset.status === 'COMPLETE'; },
      runId, { timeout: 180000, polling: 100 });
    const steps = await page.$$eval('#run-' + runId + ' tr[data-step]', (rows) => rows.map((r) => ({
      id: r.dataset.step,
      status: r.dataset.status,
      seen: r.dataset.seen,
      text: r.querySelector('.status').textContent,
      value: Number(r.querySelector('progress').value),
      max: Number(r.querySelector('progress').max),
    })));
    // The snapshot list is redrawn when the run ends: the run's snapshot, complete.
    await page.waitForFunction(
      (name) => {
        const rows = document.querySelectorAll('#snapshots tr[data-name]');
        return Array.from(rows).some((r) => r.dataset.name === name && r.cells[1].textContent === 'complete');
      },
      snapshot, { timeout: 30000, polling: 100 });
    const live = await page.textContent('#live');
    await page.screenshot({ path: shot, fullPage: true });
    console.log(JSON.stringify({ initial, steps, live, loads, errors }));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(String(e && e.stack || e)); process.exit(1); });
