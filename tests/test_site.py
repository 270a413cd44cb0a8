"""The built docs site in a real browser (Debian's headless chromium through selenium).

Builds nothing: run `python scripts/build_docs.py` first (the test command does). Serves `docs/`
on 127.0.0.1 and fails if `docs/` is missing, a chapter page (one per notebook in nbs/) is
missing or not linked from the index, a page shows a Python traceback or error output, a link
between pages is broken, or a figure has no image (every <img> loaded with a size, and at least
as many images as the notebook stores image outputs in visible cells). On the nbconvert
stand-in (docs/.stand-in) every page must also carry its banner.
"""
import functools, http.server, json, re, tempfile, threading, urllib.error, urllib.request
from pathlib import Path
from urllib.parse import urljoin, urldefrag

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS, NBS = ROOT/'docs', ROOT/'nbs'
CHROMIUM, CHROMEDRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'
CHROME_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
               '--disable-background-networking', '--disable-component-update', '--disable-sync',
               '--no-first-run', '--disable-quic', '--window-size=1280,1000']
IMAGE_MIMES = ('image/png', 'image/jpeg', 'image/gif', 'image/svg+xml')
HIDING = re.compile(r'^\s*#\|\s*(hide|export\w*|include:\s*false|output:\s*false)\s*$', re.M)
ERROR_LINE = re.compile(r'^\s*(\w+\.)*\w*(Error|Exception)(:.*)?$', re.M)   # e.g. 'SyntaxError: invalid syntax'


def notebooks():
    "Every notebook nbdev documents: nbs/**/*.ipynb, skipping names that start with '_' or '.'."
    return sorted(p.relative_to(NBS) for p in NBS.rglob('*.ipynb')
                  if not any(part.startswith(('_', '.')) for part in p.relative_to(NBS).parts))


def page_candidates(nb):
    "The stand-in names a page like its notebook; nbdev's Quarto site drops the number prefix."
    return [nb.with_suffix('.html'), nb.with_name(re.sub(r'^\d+[a-zA-Z0-9]*_', '', nb.name.lower())).with_suffix('.html')]


def page_for(nb):
    return next((c for c in page_candidates(nb) if (DOCS/c).is_file()), None)


def stored_images(nb):
    "Image outputs the notebook stores in cells the site shows."
    cells = json.loads((NBS/nb).read_text(encoding='utf-8'))['cells']
    return sum(1 for c in cells if c['cell_type'] == 'code' and not HIDING.search(''.join(c['source']))
               for o in c.get('outputs', []) if any(m in o.get('data', {}) for m in IMAGE_MIMES))


def status(url):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method='HEAD'), timeout=10) as r: return r.status
    except urllib.error.HTTPError as e: return e.code


@pytest.fixture(scope='module')
def base_url():
    if not (DOCS/'index.html').is_file():
        pytest.fail(f'{DOCS}/index.html is missing: build the site first (python scripts/build_docs.py)')
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(DOCS)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{srv.server_address[1]}/'
    srv.shutdown(); srv.server_close()


@pytest.fixture(scope='module')
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not Path(exe).is_file(): pytest.fail(f'{exe} missing: apt-get install -y chromium chromium-driver')
    with tempfile.TemporaryDirectory(prefix='site-chromium-') as profile:
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for a in CHROME_ARGS + [f'--user-data-dir={profile}']: opts.add_argument(a)
        # an explicit driver path keeps Selenium Manager from trying to download anything
        drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
        drv.set_page_load_timeout(30); drv.set_script_timeout(30)
        try: yield drv
        finally: drv.quit()


VISIT_JS = """
const done = arguments[arguments.length - 1];
const imgs = [...document.images];
imgs.forEach(i => i.loading = 'eager');
const settle = i => i.complete ? null : new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); });
Promise.race([Promise.all(imgs.map(settle)), new Promise(r => setTimeout(r, 10000))]).then(() => done({
  text: document.body.innerText,
  imgs: imgs.map(i => ({src: (i.getAttribute('src') || '').slice(0, 60), ok: i.complete && i.naturalWidth > 0})),
  errors: [...document.querySelectorAll('.cell-output-error, .cell-output-stderr, [data-mime-type="application/vnd.jupyter.stderr"]')].map(e => e.innerText),
  links: [...document.querySelectorAll('a[href]')].map(a => a.href),
}));
"""


@pytest.fixture(scope='module')
def visit(browser, base_url):
    "Load a page of the site (path relative to docs/) once and return what the browser sees."
    @functools.cache
    def _visit(rel):
        browser.get(urljoin(base_url, rel))
        return browser.execute_async_script(VISIT_JS)
    return _visit


def test_docs_built():
    assert (DOCS/'index.html').is_file(), 'docs/ is not built: run python scripts/build_docs.py first'
    print('site built by', 'the nbconvert stand-in' if (DOCS/'.stand-in').exists() else 'Quarto (nbdev_docs)')


def test_index_links_every_chapter(base_url, visit):
    links = {urldefrag(l)[0] for l in visit('index.html')['links']}
    missing = [str(nb) for nb in notebooks() if nb.stem != 'index'
               and not any(urljoin(base_url, c.as_posix()) in links for c in page_candidates(nb))]
    assert not missing, f'the index does not link to these chapters: {missing}'


@pytest.mark.parametrize('nb', notebooks(), ids=str)
def test_chapter_page(nb, base_url, visit):
    page = page_for(nb)
    assert page, f'no page for nbs/{nb} in docs/ (looked for {[str(c) for c in page_candidates(nb)]})'
    url = urljoin(base_url, page.as_posix())
    assert status(url) == 200, f'{url} is not served'
    seen = visit(page.as_posix())
    if (DOCS/'.stand-in').exists():
        assert 'Stand-in rendering' in seen['text'], f'{page}: the stand-in banner is missing'
    assert 'Traceback (most recent call last)' not in seen['text'], f'{page} shows a Python traceback'
    errors = [e for e in seen['errors'] if 'Traceback' in e or ERROR_LINE.search(e)]
    assert not errors, f'{page} shows error output: {errors[0][:500]}'
    broken = [i['src'] for i in seen['imgs'] if not i['ok']]
    assert not broken, f'{page}: images that did not load: {broken}'
    want = stored_images(nb)
    assert len(seen['imgs']) >= want, f'{page} shows {len(seen["imgs"])} images, the notebook stores {want}'
    internal = {urldefrag(l)[0] for l in seen['links'] if l.startswith(base_url) and urldefrag(l)[0].endswith('.html')}
    dead = [l for l in sorted(internal) if status(l) != 200]
    assert not dead, f'{page} links to missing pages: {dead}'
