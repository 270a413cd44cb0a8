#!/usr/bin/env python
"""Build the docs site (`docs/`) and README.md from the notebooks: `python scripts/build_docs.py`.

Where `quarto` is on the PATH this is nbdev's own build (`nbdev_docs`, then `nbdev_readme`).
Where it is not (Quarto cannot be installed on our CI machines), it runs the same nbdev
pipeline up to Quarto's input -- nbs/nbdev.yml, the module index, nbs/sidebar.yml, and the
processed notebooks in `_proc/` (show_doc cells executed, hidden cells dropped) -- and renders
those with nbconvert instead of Quarto: one HTML page per notebook (stored outputs, nothing
re-executed), a chapter list taken from sidebar.yml, a banner on every page saying it is this
stand-in, the marker file docs/.stand-in, and README.md from the processed index notebook.
The stand-in works offline: math is typeset by KaTeX, copied into docs/_katex from the
Debian package libjs-katex (or npm's katex in node_modules/); no page loads anything from
another host (nbconvert's CDN scripts for MathJax, require.js, widgets and mermaid are left out).

Both builds get the interactive figures' static twins from nbdev's processing step
(`procs = entropy_rl.figures:static_twins` in settings.ini); this script prints, per page, how
many figures, frames and bytes they add. Exits non-zero if any notebook fails processing or rendering.
"""
import html as htmlmod, os, re, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# nbdev finds settings.ini from the working directory; proc_nbs runs cells (imports of
# entropy_rl) in spawned workers, which see the package through PYTHONPATH.
os.chdir(ROOT)
os.environ['PYTHONPATH'] = os.pathsep.join(p for p in (str(ROOT), os.environ.get('PYTHONPATH')) if p)

BANNER = ('Stand-in rendering: Quarto is not installed where this was built, so these pages are '
          'nbdev\'s processed notebooks rendered with nbconvert by scripts/build_docs.py. This is '
          'not the Quarto site; run <code>nbdev_docs</code> with Quarto installed for the real one.')
CSS = """<style>
.standin-banner{background:#fff3cd;color:#664d03;border-bottom:2px solid #e0a800;padding:.6rem 1rem;font:15px/1.4 sans-serif}
.standin-nav{padding:.4rem 1rem;border-bottom:1px solid #ddd;font:14px/1.6 sans-serif}
.standin-nav ol{display:inline;margin:0;padding:0}.standin-nav li{display:inline;margin-right:1.2em}
.standin-nav .current{font-weight:bold}
</style>"""
# nbconvert's lab template, less everything it would fetch from a CDN; math by the local KaTeX
TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_js_mathjax -%}
<link rel="stylesheet" href="{{ resources.katex_url }}/katex.min.css">
<script defer src="{{ resources.katex_url }}/katex.min.js"></script>
<script defer src="{{ resources.katex_url }}/contrib/auto-render.js"></script>
<script defer src="{{ resources.katex_url }}/render-math.js"></script>
{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block html_head_css -%}<link rel="icon" href="data:,">{%- endblock html_head_css -%}
"""
RENDER_MATH = """document.addEventListener('DOMContentLoaded', function () {
  renderMathInElement(document.body, {throwOnError: false, delimiters: [
    {left: '$$', right: '$$', display: true}, {left: '$', right: '$', display: false}]});
});
"""
# KaTeX, unlike MathJax, wants a braced group after _ or ^ for operator names (L_\max -> L_{\max})
KATEX_SUBSCRIPT = re.compile(r'([_^])\\(max|min|sup|inf|lim|log|ln|exp|det|gcd|deg|arg(?:max|min)?|Pr)\b')
KATEX_DIRS = ('/usr/share/javascript/katex', 'node_modules/katex/dist')   # Debian libjs-katex, npm katex
FIGURE = re.compile(r'<!-- erl-figure (\w+) frames=(\d+) unique=(\d+) -->.*?<!-- /erl-figure \1 -->', re.S)
DIRECTIVE = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')
REL_NB_LINK = r'(?![a-zA-Z][\w+.-]*:|/|#)([^"#)\s]+)\.ipynb'   # a relative link to a notebook


def quarto_build():
    print('build_docs: quarto found on PATH -> the real nbdev/Quarto build (nbdev_docs, nbdev_readme)')
    for cmd in ('nbdev_docs', 'nbdev_readme'):
        if subprocess.call([cmd]) != 0: sys.exit(f'build_docs: {cmd} failed')


def process_notebooks():
    "nbdev's `_pre_docs` without `_ensure_quarto` (which would try to download Quarto)."
    from nbdev.config import get_config
    from nbdev.doclinks import _build_modidx, nbglob
    from nbdev.quarto import nbdev_sidebar, refresh_quarto_yml
    from nbdev.serve import proc_nbs
    cfg = get_config()
    refresh_quarto_yml()
    _build_modidx()
    nbdev_sidebar.__wrapped__(path=cfg.nbs_path)
    # force: a cached _proc/ could hide a notebook that no longer processes (e.g. after a module change)
    cache = proc_nbs(cfg.nbs_path, force=True)
    nbs = [Path(p).relative_to(cfg.nbs_path) for p in nbglob(cfg.nbs_path, file_re=r'\.ipynb$')]
    missing = [str(p) for p in nbs if not (cache/p).exists()]
    if missing: raise RuntimeError(f'nbdev did not produce processed notebooks for: {missing}')
    return cfg, cache


def chapters(nbs_path):
    "Notebook paths (relative to nbs/) in the order of the generated sidebar.yml."
    import yaml
    def flat(items):
        for it in items:
            if isinstance(it, str): yield it
            elif isinstance(it, dict):
                if 'href' in it: yield it['href']
                yield from flat(it.get('contents', []))
    side = yaml.safe_load((nbs_path/'sidebar.yml').read_text())
    return [p for p in flat(side['website']['sidebar']['contents']) if p.endswith('.ipynb')]


def prepare(path):
    "Read a processed notebook; turn its frontmatter back into a heading and apply Quarto cell options."
    import nbformat, yaml
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop('widgets', None)   # live widget state: the site shows static twins instead
    nb.metadata.setdefault('language_info', {'name': 'python'})  # code fences get their language
    fm = {}
    if nb.cells and nb.cells[0].cell_type == 'raw':
        m = re.match(r'\s*---\n(.*?)\n---', nb.cells[0].source, re.S)
        if m: fm = yaml.safe_load(m.group(1)) or {}; nb.cells.pop(0)
    title = str(fm.get('title') or path.stem)
    head = f'# {title}' + (f"\n\n> {fm['description']}" if fm.get('description') else '')
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(head))
    for cell in nb.cells:
        if cell.cell_type == 'markdown': cell.source = KATEX_SUBSCRIPT.sub(r'\1{\\\2}', cell.source)
        if cell.cell_type != 'code': continue
        lines = cell.source.splitlines()
        opts = dict(m.groups() for m in map(DIRECTIVE.match, lines) if m)
        cell.source = '\n'.join(l for l in lines if not DIRECTIVE.match(l))
        tags = cell.metadata.setdefault('tags', [])
        if opts.get('echo') == 'false' or not cell.source.strip(): tags.append('remove_input')
        if opts.get('output') == 'false': tags.append('remove_output')
        if opts.get('include') == 'false': tags.append('remove_cell')
    return nb, title


def exporter(cls, **kw):
    from traitlets.config import Config
    return cls(exclude_input_prompt=True, exclude_output_prompt=True, config=Config(TagRemovePreprocessor=dict(
        remove_input_tags={'remove_input'}, remove_all_outputs_tags={'remove_output'},
        remove_cell_tags={'remove_cell'})), **kw)


def ship_katex(docs):
    "Copy KaTeX (css, js, auto-render, fonts) into docs/_katex, with the call that typesets every page."
    src = next((Path(d) for d in (os.environ.get('KATEX_DIR'), *KATEX_DIRS) if d and (Path(d)/'katex.min.js').is_file()), None)
    if src is None:
        raise RuntimeError('KaTeX not found (looked in $KATEX_DIR and ' + ', '.join(KATEX_DIRS) + '): '
                           'apt-get install libjs-katex, or npm install katex')
    dst = docs/'_katex'
    for f in ('katex.min.css', 'katex.min.js', 'contrib/auto-render.js'):
        (dst/f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src/f, dst/f)
    shutil.copytree(src/'fonts', dst/'fonts')   # follows Debian's symlink to the font package
    (dst/'render-math.js').write_text(RENDER_MATH)
    print(f'build_docs: KaTeX from {src} -> {dst.relative_to(ROOT)}')


def figure_report(pages):
    "Per page: interactive figures (static twins), their frames and the bytes they add."
    total = 0
    for out in pages:
        figs = [(m.group(2), m.group(3), len(m.group(0).encode())) for m in FIGURE.finditer(out.read_text(encoding='utf-8'))]
        if not figs: continue
        size = sum(b for *_, b in figs); total += size
        print(f'build_docs: figures {out.relative_to(ROOT)}: {len(figs)} figure(s), frames (unique) '
              + ', '.join(f'{f} ({u})' for f, u, _ in figs) + f', {size / 1e3:,.0f} kB of '
              f'{out.stat().st_size / 1e3:,.0f} kB')
    print(f'build_docs: static twins add {total / 1e6:.2f} MB to the site')


def render_site(cfg, cache):
    import yaml
    from nbconvert import HTMLExporter
    docs = cfg.doc_path
    site_title = yaml.safe_load((cfg.nbs_path/'nbdev.yml').read_text())['website']['title']
    pages = [(Path(p), *prepare(cache/p)) for p in chapters(cfg.nbs_path)]
    # non-notebook files nbdev copied to _proc (images, css) travel with the pages
    shutil.copytree(cache, docs, ignore=shutil.ignore_patterns('*.ipynb', '*.yml', '.*'))
    import jinja2
    html_exp = exporter(HTMLExporter, extra_loaders=[jinja2.DictLoader({'standin.html.j2': TEMPLATE})],
                        template_file='standin.html.j2')
    ship_katex(docs)
    written = []
    for rel, nb, title in pages:
        out = docs/rel.with_suffix('.html')
        up = os.path.relpath(docs, out.parent)
        links = ''.join(f'<li><a href="{up}/{r.with_suffix(".html").as_posix()}"'
                        f'{" class=current" if r == rel else ""}>{htmlmod.escape(t)}</a></li>' for r, _, t in pages)
        nav = (f'<div class="standin-banner" id="standin-banner">{BANNER}</div>\n<nav class="standin-nav">'
               f'<a href="{up}/index.html"><b>{htmlmod.escape(site_title)}</b></a> &middot; chapters: <ol>{links}</ol></nav>')
        html, _ = html_exp.from_notebook_node(nb, resources={'metadata': {'name': f'{title} – {site_title}'},
                                                             'katex_url': f'{up}/_katex'})
        html = re.sub(f'href="{REL_NB_LINK}', r'href="\1.html', html)
        html = html.replace('</head>', CSS + '\n</head>', 1)
        html = re.sub(r'(<body[^>]*>)', lambda m: m.group(1) + '\n' + nav, html, count=1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(html, encoding='utf-8')
        written.append(out)
        print(f'build_docs: {out.relative_to(ROOT)}')
    figure_report(written)
    (docs/'.stand-in').write_text('Built by the nbconvert stand-in of scripts/build_docs.py (no Quarto); '
                                  'not the Quarto site.\n')


def render_readme(cfg, cache):
    from nbconvert import MarkdownExporter
    nb, _ = prepare(cache/cfg.readme_nb)
    files = Path(cfg.readme_nb).stem + '_files'
    md, res = exporter(MarkdownExporter).from_notebook_node(nb, resources={'output_files_dir': files})
    shutil.rmtree(cfg.config_path/files, ignore_errors=True)
    for name, data in res.get('outputs', {}).items():
        (cfg.config_path/name).parent.mkdir(parents=True, exist_ok=True)
        (cfg.config_path/name).write_bytes(data)
    nbs_rel = cfg.nbs_path.relative_to(cfg.config_path).as_posix()
    md = re.sub(rf'\]\({REL_NB_LINK}', rf']({nbs_rel}/\1.ipynb', md)  # README sits at the repo root
    note = (f'<!-- Generated from {nbs_rel}/{cfg.readme_nb} by scripts/build_docs.py (nbconvert stand-in, '
            'no Quarto). Do not edit: edit the notebook and rebuild. -->\n')
    (cfg.config_path/'README.md').write_text(note + md.lstrip(), encoding='utf-8')
    print('build_docs: README.md')


def main():
    from nbdev.config import get_config
    shutil.rmtree(get_config().doc_path, ignore_errors=True)  # a failed build must leave no stale site behind
    if shutil.which('quarto'): return quarto_build()
    print('build_docs: quarto NOT on PATH -> nbconvert stand-in (not the Quarto site)')
    try:
        cfg, cache = process_notebooks()
        render_site(cfg, cache)
        render_readme(cfg, cache)
    except Exception as e:
        import traceback; traceback.print_exc()
        sys.exit(f'build_docs: FAILED: {type(e).__name__}: {e}')
    print(f'build_docs: stand-in site written to {cfg.doc_path.relative_to(ROOT)}/ (marker docs/.stand-in)')


if __name__ == '__main__': main()
