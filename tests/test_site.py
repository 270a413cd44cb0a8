"""The built docs site in a real browser (Debian's headless chromium through selenium), as a reader sees it.

Builds nothing: run `python scripts/build_docs.py` first (the test command does). Serves `docs/`
on 127.0.0.1, with every other host unreachable from the browser, and fails if `docs/` is
missing, a chapter page (one per notebook in nbs/) is missing or not linked from the index, a
page shows a Python traceback or error output, a link between pages is broken, a figure has no
image (every <img> loaded with a size, and at least as many images as the notebook stores image
outputs in visible cells), or the browser console reports an error. On the nbconvert stand-in
(docs/.stand-in) every page must also carry its banner and work offline: no request leaves
127.0.0.1, and no raw `$`/`$$` math is left in the text (the math renderer made its elements,
without errors). The Quarto site loads MathJax from its CDN by design, so there these two
offline checks are skipped with that reason.

Interactive figures: every figure a notebook stores as live (an ipywidgets output or an
interactive-figure specification of entropy_rl.figures) must be on its page as a static twin, and
moving each of its controls must change the displayed image. Every mechanism chapter (00-07, and
16 onward) must have at least one.
"""
import functools, http.server, itertools, json, re, tempfile, threading, urllib.error, urllib.request
from pathlib import Path
from urllib.parse import urljoin, urldefrag

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS, NBS = ROOT/'docs', ROOT/'nbs'
CHROMIUM, CHROMEDRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'
CHROME_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
               '--disable-background-networking', '--disable-component-update', '--disable-sync',
               '--no-first-run', '--disable-quic', '--window-size=1280,1000',
               '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1']   # nothing else is reachable
IMAGE_MIMES = ('image/png', 'image/jpeg', 'image/gif', 'image/svg+xml')
HIDING = re.compile(r'^\s*#\|\s*(hide|export\w*|include:\s*false|output:\s*false)\s*$', re.M)
FIGURE_MIME, WIDGET_MIME = 'application/vnd.entropy-rl.figure+json', 'application/vnd.jupyter.widget-view+json'
INTERACT = re.compile(r'\binteract(ive|_manual|ive_output)?\(')   # ipywidgets' live figures (not progress bars)
MECHANISM = re.compile(r'^(0[0-7]|1[6-9]|[2-9]\d|\d{3,})_')   # mechanism chapters: 00-07 and 16 onward
LOCAL = ('data:', 'blob:', 'about:', 'chrome:', 'chrome-extension:', 'devtools:')   # not network requests
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


def stored_figures(nb):
    "Interactive figures the notebook stores in cells the site shows: figure specifications, and ipywidgets `interact` outputs."
    cells = json.loads((NBS/nb).read_text(encoding='utf-8'))['cells']
    return sum(1 for c in cells if c['cell_type'] == 'code' and not HIDING.search(''.join(c['source']))
               for o in c.get('outputs', []) if FIGURE_MIME in o.get('data', {})
               or (WIDGET_MIME in o.get('data', {}) and INTERACT.search(''.join(c['source']))))


def has_math(nb):
    "Does a markdown cell of the notebook contain $...$ or $$...$$ math?"
    cells = json.loads((NBS/nb).read_text(encoding='utf-8'))['cells']
    return any(re.search(r'\$[^$\s][^$]*\$', ''.join(c['source'])) for c in cells if c['cell_type'] == 'markdown')


STANDIN = (DOCS/'.stand-in').exists()
offline_only = pytest.mark.skipif(DOCS.is_dir() and not STANDIN, reason='a Quarto build loads MathJax from its CDN '
                                  'by design; the offline checks apply to the stand-in')


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
        opts.set_capability('goog:loggingPrefs', {'browser': 'ALL', 'performance': 'ALL'})
        # an explicit driver path keeps Selenium Manager from trying to download anything
        drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
        drv.set_page_load_timeout(30); drv.set_script_timeout(30)
        try: yield drv
        finally: drv.quit()


VISIT_JS = r"""
const done = arguments[arguments.length - 1];
const imgs = [...document.images];
imgs.forEach(i => i.loading = 'eager');
const settle = i => i.complete ? null : new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); });
Promise.race([Promise.all(imgs.map(settle)), new Promise(r => setTimeout(r, 10000))]).then(() => done({
  text: document.body.innerText,
  imgs: imgs.map(i => ({src: (i.getAttribute('src') || '').slice(0, 60), ok: i.complete && i.naturalWidth > 0})),
  errors: [...document.querySelectorAll('.cell-output-error, .cell-output-stderr, [data-mime-type="application/vnd.jupyter.stderr"]')].map(e => e.innerText),
  links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  math: document.querySelectorAll('.katex, mjx-container, .MathJax').length,
  math_errors: [...document.querySelectorAll('.katex-error')].map(e => e.getAttribute('title') || e.textContent),
  raw_math: rawMath(),
  figures: document.querySelectorAll('.erl-figure').length,
}));
function rawMath() {
  // text a reader sees outside code and rendered math that still looks like TeX source
  const skip = 'pre, code, script, style, textarea, option, .katex, mjx-container, .MathJax';
  const w = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {acceptNode: n =>
      n.parentElement && n.parentElement.closest(skip) ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT});
  const out = [];
  while (w.nextNode()) {
    const t = w.currentNode.textContent;
    if (/\$\$|\$[^$\s][^$]*\$|\\\(|\\\[/.test(t)) out.push(t.trim().slice(0, 100));
  }
  return out;
}
"""


def drain_logs(drv):
    "(console errors, URLs requested) since the last call."
    errors = [e['message'] for e in drv.get_log('browser') if e['level'] == 'SEVERE']
    urls = []
    for e in drv.get_log('performance'):
        msg = json.loads(e['message'])['message']
        if msg['method'] == 'Network.requestWillBeSent':
            urls.append(msg['params']['request']['url'])
    return errors, urls


@pytest.fixture(scope='module')
def visit(browser, base_url):
    "Load a page of the site (path relative to docs/) once and return what the browser sees."
    @functools.cache
    def _visit(rel):
        drain_logs(browser)
        browser.get(urljoin(base_url, rel))
        seen = browser.execute_async_script(VISIT_JS)
        seen['console_errors'], urls = drain_logs(browser)
        seen['external'] = [u for u in urls if not u.startswith(base_url) and not u.startswith(LOCAL)]
        return seen
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
    assert not seen['console_errors'], f'{page}: console errors: {seen["console_errors"][:3]}'


@offline_only
@pytest.mark.parametrize('nb', notebooks(), ids=str)
def test_page_works_offline(nb, visit):
    page = page_for(nb)
    assert page, f'no page for nbs/{nb}'
    seen = visit(page.as_posix())
    assert not seen['external'], f'{page} requests other hosts: {seen["external"][:5]}'
    assert not seen['raw_math'], f'{page} shows raw TeX (math not typeset): {seen["raw_math"][:3]}'
    assert not seen['math_errors'], f'{page}: the math renderer failed on: {seen["math_errors"][:3]}'
    if has_math(nb):
        assert seen['math'] > 0, f'{page}: the notebook has math but the page has no typeset math elements'


MOVE_JS = """
const [fig, k] = arguments;
const root = document.querySelectorAll('.erl-figure')[fig], el = root.querySelectorAll('[data-control]')[k];
const img = root.querySelector('img.erl-frame'), out = el.parentElement.querySelector('output');
return {src: img.src, ok: img.complete && img.naturalWidth > 0, value: el.value, label: out ? out.textContent : null,
        kind: el.tagName.toLowerCase(), max: el.max || String(el.options.length - 1)};
"""


@pytest.mark.parametrize('nb', notebooks(), ids=str)
def test_interactive_figures_move(nb, browser, base_url, visit):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select
    page = page_for(nb)
    assert page, f'no page for nbs/{nb}'
    want = stored_figures(nb)
    if MECHANISM.match(nb.name):
        assert want > 0, f'nbs/{nb} is a mechanism chapter without an interactive figure (entropy_rl.figures.interactive_figure)'
    have = visit(page.as_posix())['figures']
    assert have >= want, f'{page}: the notebook stores {want} interactive figure(s), the page has {have} static twin(s)'
    if not want: return
    drain_logs(browser)
    browser.get(urljoin(base_url, page.as_posix()))
    roots = browser.find_elements(By.CSS_SELECTOR, '.erl-figure')
    for f, root in enumerate(roots):
        for k, el in enumerate(root.find_elements(By.CSS_SELECTOR, '[data-control]')):
            before = browser.execute_script(MOVE_JS, f, k)
            assert before['ok'], f'{page}: figure {f} shows no image'
            browser.execute_script('arguments[0].scrollIntoView({block: "center"})', el)
            # one step away from the default (as a reader would: arrow key, or another option), then back
            if before['kind'] == 'select':
                sel, j = Select(el), int(before['value'])
                sel.select_by_index(j + 1 if j == 0 else j - 1)
            else:
                there, back = (Keys.ARROW_RIGHT, Keys.ARROW_LEFT) if before['value'] == '0' else (Keys.ARROW_LEFT, Keys.ARROW_RIGHT)
                el.send_keys(there)
            after = browser.execute_script(MOVE_JS, f, k)
            assert after['value'] != before['value'], f'{page}: figure {f}, control {k} did not move'
            assert after['ok'], f'{page}: figure {f}, control {k}: the new frame did not load'
            assert after['src'] != before['src'], f'{page}: figure {f}: moving control {k} did not change the image'
            if after['label'] is not None:
                assert after['label'] != before['label'], f'{page}: figure {f}, control {k}: the value shown did not change'
            if before['kind'] == 'select': sel.select_by_index(j)
            else: el.send_keys(back)
            assert browser.execute_script(MOVE_JS, f, k)['src'] == before['src'], \
                f'{page}: figure {f}: moving control {k} back did not restore the image'
    errors, _ = drain_logs(browser)
    assert not errors, f'{page}: console errors while moving the controls: {errors[:3]}'
