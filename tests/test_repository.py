"""The repository stands on its own: no tracked file names notes or paths outside it, and every
citation of docs/method.md names one of its sections."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIS_FILE = os.path.relpath(os.path.abspath(__file__), ROOT).replace(os.sep, '/')

# Built from pieces so that this file does not contain them literally (it is scanned too).
FORBIDDEN = (
    'REFERENCE' + '.md',      # private notes that are not part of the repository
    'DESIGN' + '.md',
    '..' + '/shared',         # a folder next to the checkout
    '/' + 'work' + '/',       # an absolute path of a development machine
)


def tracked_files():
    """Paths (relative to the root) of every file git tracks; skips the test without git."""
    if shutil.which('git') is None or not os.path.exists(os.path.join(ROOT, '.git')):
        pytest.skip('git or the .git directory is not available')
    result = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True)
    if result.returncode != 0:
        pytest.skip(f'git ls-files failed: {result.stderr.decode(errors="replace").strip()}')
    return [p for p in result.stdout.decode().split('\0') if p]


def read_tracked(path):
    """The file's bytes, or None when it is gone from the work tree (a deletion not yet
    committed)."""
    full = os.path.join(ROOT, path)
    if not os.path.isfile(full):
        return None
    with open(full, 'rb') as f:
        return f.read()


def forbidden_lines(content: bytes, needles):
    """[(line number, needle)] for each line of ``content`` that contains one of ``needles``."""
    return [(line_number, needle)
            for line_number, line in enumerate(content.splitlines(), start=1)
            for needle in needles if needle in line]


def test_the_scan_finds_each_forbidden_string():
    needles = [s.encode() for s in FORBIDDEN]
    for i, needle in enumerate(needles):
        content = b'clean line\n# see ' + needle + b' for this\nclean again\n'
        assert forbidden_lines(content, needles) == [(2, needle)], FORBIDDEN[i]
    assert forbidden_lines(b'docs/method.md, section "Losses"\n', needles) == []


def test_no_tracked_file_names_outside_notes_or_paths():
    needles = [s.encode() for s in FORBIDDEN]
    # The checkout's own absolute path: a file naming it would only work on this machine.
    if len(ROOT) > 1:
        needles.append(ROOT.encode())
    problems = []
    for path in tracked_files():
        content = read_tracked(path)
        if content is None:
            continue
        problems += [f'{path}:{line_number}: names {needle.decode()!r}'
                     for line_number, needle in forbidden_lines(content, needles)]
    assert not problems, ('Tracked files refer to things outside the repository; cite '
                          'docs/method.md (and its section) or the paper instead:\n  '
                          + '\n  '.join(problems))


# A citation: the doc's path, a comma, the word section(s) and one or more quoted titles joined
# by commas or "and", across line breaks and comment markers.
CITATION = re.compile(r'docs/method\.md`?,\s*(?:#\s*)?sections?\s+((?:"[^"]+"\s*(?:,|and)?\s*)+)')


def method_sections():
    with open(os.path.join(ROOT, 'docs', 'method.md'), encoding='utf-8') as f:
        headings = re.findall(r'^## \d+\. (.+)$', f.read(), flags=re.MULTILINE)
    return set(headings)


def test_citations_of_method_name_existing_sections():
    sections = method_sections()
    assert {'Losses', 'BatchNorm modes', 'Evaluation', 'Stabilisers'} <= sections
    problems, cited = [], 0
    for path in tracked_files():
        content = read_tracked(path)
        if content is None or b'\0' in content or path == THIS_FILE:
            continue
        text = content.decode('utf-8', errors='replace')
        for match in CITATION.finditer(text):
            for title in re.findall(r'"([^"]+)"', match.group(1)):
                title = re.sub(r'\s+(?:#\s+)?', ' ', title).strip()
                cited += 1
                if title not in sections:
                    line_number = text.count('\n', 0, match.start()) + 1
                    problems.append(f'{path}:{line_number}: section {title!r}')
    assert cited > 20, f'only {cited} section citations found: is the pattern still right?'
    assert not problems, ('Citations of docs/method.md name sections it does not have (its '
                          f'sections: {sorted(sections)}):\n  ' + '\n  '.join(problems))
