"""Tests of the launcher `gpumem` and of `gpumem-report` (run by meson, tests/tools/meson.build).

  python3 test_report.py CLASS...   e.g. Launcher, Summary, Diff, Plot, Errors, EndToEnd

Paths come from the environment: TOOLS_LAUNCHER (the build tree's gpumem-uninstalled),
TOOLS_REPORT (scripts/gpumem-report), TOOLS_DEMO (gpumem-demo), TOOLS_DATA (tests/tools/data);
LD_LIBRARY_PATH finds the fake libcuda.so.1. Nothing is skipped: a missing dependency fails.
"""
import os
import re
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

LAUNCHER, REPORT, DEMO = (os.environ.get(v, '') for v in ('TOOLS_LAUNCHER', 'TOOLS_REPORT', 'TOOLS_DEMO'))
DATA = Path(os.environ.get('TOOLS_DATA', Path(__file__).parent / 'data'))
FLAGS = {'--limit': 'GPUMEM_LIMIT', '--shared': 'GPUMEM_SHARED', '--report': 'GPUMEM_REPORT', '--format': 'GPUMEM_REPORT_FORMAT',
         '--trace': 'GPUMEM_TRACE', '--suppressions': 'GPUMEM_SUPPRESSIONS',
         '--leak-exitcode': 'GPUMEM_LEAK_EXITCODE', '--no-pool': 'GPUMEM_POOL=0',
         '--fast-free': 'GPUMEM_FREE_SYNC=0', '--verbose': 'GPUMEM_VERBOSE', '--shim': '',
         '--help': '', '--version': ''}


def run(cmd, env=None, pythonpath=None, cwd=None):
    env = dict(os.environ, **(env or {}))
    if pythonpath:
        env['PYTHONPATH'] = pythonpath
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


def gpumem(*args, **kw):
    return run(['bash', LAUNCHER, *args], **kw)


def report(*args, **kw):
    return run([sys.executable, REPORT, *args], **kw)


class Launcher(unittest.TestCase):
    def test_help_lists_every_flag_and_variable(self):
        r = gpumem('--help')
        self.assertEqual(r.returncode, 0, r.stderr)
        for flag, var in FLAGS.items():
            self.assertIn(flag, r.stdout)
            self.assertIn(var, r.stdout)

    def test_version(self):
        r = gpumem('--version')
        self.assertEqual(r.returncode, 0)
        self.assertRegex(r.stdout, r'^gpumem \d+\.\d+\.\d+ \(shim: /.*libgpumem_shim\.so\)$')

    def check_refused(self, args, *words):
        r = gpumem(*args, 'true')
        self.assertEqual(r.returncode, 2, f'{args}: {r.stderr}')
        self.assertEqual(r.stdout, '')
        self.assertEqual(r.stderr.count('\n'), 1, r.stderr)
        self.assertTrue(r.stderr.startswith('gpumem: ') and r.stderr.rstrip().endswith('see gpumem --help'), r.stderr)
        for w in words:
            self.assertIn(w, r.stderr)

    def test_bad_flags(self):
        self.check_refused(['--bogus'], "'--bogus'", '--limit', '--leak-exitcode', '--version')
        self.check_refused(['-x'], "'-x'", '--limit')
        self.check_refused(['--no-pool=1'], '--no-pool takes no value')
        self.check_refused(['--format', 'xml'], "'xml'", 'text or json')
        self.check_refused(['--verbose', '9'], "'9'", '0 to 3')
        self.check_refused(['--suppressions', '/nonexistent/gpumem.supp'], '/nonexistent/gpumem.supp')
        self.check_refused(['--limit='], '--limit needs a value')
        self.check_refused(['--trace', '--no-pool'], '--trace needs a value')

    def test_missing_value_or_program(self):
        for args, words in ((['--limit'], '--limit needs a value'), ([], 'no program given'),
                            (['--no-pool', '--'], 'no program given')):
            r = gpumem(*args)
            self.assertEqual(r.returncode, 2)
            self.assertIn(words, r.stderr)
            self.assertIn('see gpumem --help', r.stderr)

    def test_leak_exitcode_range(self):
        for bad in ('0', '77', '256', '-1', 'abc', '1.5'):
            self.check_refused(['--leak-exitcode', bad], f"'{bad}'", '1 to 255, not 77')
            self.check_refused([f'--leak-exitcode={bad}'], f"'{bad}'")
        r = gpumem('--leak-exitcode', '9', 'sh', '-c', 'printf %s "$GPUMEM_LEAK_EXITCODE"')
        self.assertEqual((r.returncode, r.stdout), (0, '9'))

    def test_exit_status_passes_through(self):
        for args in (['sh', '-c', 'exit 3'], ['--', 'sh', '-c', 'exit 3'], ['--no-pool', 'sh', '-c', 'exit 3']):
            self.assertEqual(gpumem(*args).returncode, 3, args)
        self.assertEqual(gpumem('false').returncode, 1)
        self.assertEqual(gpumem('/nonexistent/program').returncode, 127)

    def test_environment(self):
        with tempfile.TemporaryDirectory() as d:
            supp = Path(d) / 'x.supp'
            supp.write_text('leak:libfoo.so\n')
            r = gpumem('--limit=4GiB', '--shared', 'budget', '--report', 'r.%p.json', '--format=json', '--trace', 't.json',
                       '--suppressions', 'x.supp', '--no-pool', '--fast-free', '--verbose', '1', 'env',
                       env={'LD_PRELOAD': 'libc.so.6'}, cwd=d)
            self.assertEqual(r.returncode, 0, r.stderr)
            env = dict(line.split('=', 1) for line in r.stdout.splitlines() if '=' in line)
            d = os.path.realpath(d)
            want = {'GPUMEM_LIMIT': '4GiB', 'GPUMEM_SHARED': f'{d}/budget', 'GPUMEM_REPORT': f'{d}/r.%p.json', 'GPUMEM_REPORT_FORMAT': 'json',
                    'GPUMEM_TRACE': f'{d}/t.json', 'GPUMEM_SUPPRESSIONS': f'{d}/x.supp', 'GPUMEM_POOL': '0',
                    'GPUMEM_FREE_SYNC': '0', 'GPUMEM_VERBOSE': '1'}
            self.assertEqual({k: env.get(k) for k in want}, want)
            shim = gpumem('--version').stdout.split('(shim: ')[1].rstrip(')\n')
            self.assertEqual(env['LD_PRELOAD'], f'{shim}:libc.so.6')

    def test_build_tree_launcher_uses_the_build_trees_shim(self):
        # build/scripts/gpumem is configured with the install prefix's shim; run from the build
        # tree (directly or through a symbolic link) it preloads build/shim's instead.
        prefix_launcher, build_shim = os.environ['TOOLS_LAUNCHER_PREFIX'], os.environ['TOOLS_BUILD_SHIM']
        want = os.path.realpath(build_shim)
        r = run(['bash', prefix_launcher, '--version'])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.split('(shim: ')[1].rstrip(')\n'), want, r.stdout)
        with tempfile.TemporaryDirectory() as d:
            link = Path(d) / 'gpumem'
            link.symlink_to(prefix_launcher)
            r = run([str(link), '--version'])
            self.assertEqual(r.stdout.split('(shim: ')[1].rstrip(')\n'), want, r.stdout)
            # A copy outside the build tree (as installed) keeps the prefix's shim.
            copy = Path(d) / 'installed-gpumem'
            copy.write_text(Path(prefix_launcher).read_text())
            r = run(['bash', str(copy), '--version'])
            self.assertEqual(r.returncode, 0, r.stderr)
            shim = r.stdout.split('(shim: ')[1].rstrip(')\n')
            self.assertNotEqual(shim, want, r.stdout)
            self.assertTrue(shim.endswith('/libgpumem_shim.so') and '/shim/' not in shim, shim)
            # And the build tree's launcher runs a program under that shim.
            r = run(['bash', prefix_launcher, '--limit', '64MiB', DEMO])
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn('64 MiB total', r.stdout)

    def test_missing_shim(self):
        r = gpumem('--shim', '/nonexistent/libgpumem_shim.so', 'true')
        self.assertEqual(r.returncode, 2)
        self.assertIn('/nonexistent/libgpumem_shim.so', r.stderr)

    def test_limit_on_the_demo(self):
        r = gpumem('--limit', '64MiB', DEMO)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn('64 MiB total', r.stdout)   # cuMemGetInfo under the limit
        self.assertIn('cuMemAlloc(128 MiB) -> CUDA_ERROR_OUT_OF_MEMORY', r.stdout)
        self.assertIn('limit 67108864 B', r.stderr)
        self.assertIn('LEAK SUMMARY: 5245880 bytes leaked in 2 allocations', r.stderr)
        # With the report off, stderr keeps only the demo's two refused copies (they are errors).
        quiet = gpumem('--limit=64MiB', '--report', 'off', DEMO).stderr
        self.assertNotIn('LEAK SUMMARY', quiet)
        self.assertEqual(quiet.count('refused with CUDA_ERROR_INVALID_VALUE'), 2, quiet)
        self.assertEqual([l for l in quiet.splitlines()
                          if not l.startswith(('gpumem: cuMemcpyHtoD_v2: ', '    #'))], [], quiet)


class Summary(unittest.TestCase):
    def test_reports(self):
        r = report('summary', str(DATA / 'report-old.json'), str(DATA / 'report-new.json'))
        self.assertEqual(r.returncode, 0, r.stderr)
        out = r.stdout
        self.assertIn('report 1 of 2: pid 4242 /opt/app/app (context destroyed)', out)
        self.assertIn('report 2 of 2: pid 4242 /opt/app/app (at exit)', out)
        # largest first, with frames; suppressed groups named by their pattern
        exit_part = out.split('(at exit)')[1]
        self.assertLess(exit_part.index('1048576 bytes'), exit_part.index('3000 bytes'))
        self.assertIn('#0 train_step app+0x12c3 (train.cu:88)', out)
        self.assertIn('#1 main app+0x14f0 (train.cu:140)', out)
        self.assertIn('suppressed by leak:libtorch_cuda.so', out)
        self.assertIn('leaked: 1051576 bytes (1.0 MiB) in 5 allocation(s) in 2 group(s); '
                      'suppressed: 67108864 bytes in 2 allocation(s)', out)

    def test_frames_option(self):
        r = report('summary', '--frames', '1', str(DATA / 'report-new.json'))
        self.assertNotIn('#1 ', r.stdout)
        self.assertIn('1 more frame(s)', r.stdout)

    def check_trace(self, path, closed=True):
        r = report('summary', str(path))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn('device 0: peak allocated 8388608 bytes (8.0 MiB), peak reserved 10485760 bytes', r.stdout)
        self.assertIn('device 1: peak allocated 3000 bytes', r.stdout)
        self.assertIn('limit rejection 1, oom retry 1', r.stdout)
        self.assertEqual('the program did not exit normally' in r.stdout, not closed)
        return r

    def test_trace(self):
        self.assertIn('leak check point 2', self.check_trace(DATA / 'trace.json').stdout)

    def test_trace_without_closing_bracket(self):
        self.assertIn('leak check point 1', self.check_trace(DATA / 'trace-crashed.json', False).stdout)
        text = (DATA / 'trace.json').read_text()
        with tempfile.TemporaryDirectory() as d:
            for name, cut in (('comma', text.rstrip().rstrip(']').rstrip() + ',\n'),
                              ('half-line', text[:text.rindex('"at exit"')])):
                path = Path(d) / name
                path.write_text(cut)
                self.check_trace(path, False)

    def test_reports_and_traces_together(self):
        r = report('summary', str(DATA / 'report-new.json'), str(DATA / 'trace.json'))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn('pid 6161', r.stdout)
        self.assertIn('instant events:', r.stdout)


class Diff(unittest.TestCase):
    def diff(self, old, new):
        return report('diff', str(DATA / old), str(DATA / new))

    def test_new_leak_fails(self):
        r = self.diff('report-old.json', 'report-new.json')
        self.assertEqual(r.returncode, 1, r.stderr)
        added = r.stdout.split('new leaks (in NEW, not in OLD):\n')[1].split('fixed leaks')[0]
        self.assertIn('+ 524288 bytes (512.0 KiB) in 2 allocation(s) on device 0', added)
        self.assertIn('#0 decode_batch app+0x1a80 (data.cu:17)', added)
        self.assertNotIn('train_step', added)
        removed = r.stdout.split('fixed leaks (in OLD, not in NEW):\n')[1].split('changed leaks')[0]
        self.assertIn('- 3000 bytes', removed)
        self.assertIn('load_weights', removed)
        changed = r.stdout.split('changed leaks:\n')[1]
        self.assertIn('~ 2097152 bytes (2.0 MiB) in 8 allocation(s) on device 0 (was 1048576 bytes in 4: +1048576 bytes)', changed)
        self.assertIn('1 new, 1 fixed, 1 changed leak group(s); leaked 1051576 -> 2621440 bytes', r.stdout)

    def test_same_leaks_pass(self):
        for old, new in (('report-old.json', 'report-old.json'), ('report-old.json', 'report-moved.json')):
            r = self.diff(old, new)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn('0 new, 0 fixed, 0 changed', self.diff('report-old.json', 'report-moved.json').stdout)


class Plot(unittest.TestCase):
    def test_without_matplotlib(self):
        with tempfile.TemporaryDirectory() as d:
            Path(d, 'matplotlib.py').write_text('raise ImportError("hidden by the test")\n')
            r = report('plot', str(DATA / 'trace.json'), str(Path(d) / 'out.png'), pythonpath=d)
        self.assertEqual(r.returncode, 3)
        self.assertEqual(r.stderr, 'gpumem-report: plot needs matplotlib (pip install matplotlib)\n')

    def test_plot(self):
        # matplotlib is an optional dependency of the tool; scripts/setup-deps.sh installs Debian's
        # python3-matplotlib, which may not be the python3 first on PATH.
        python = next((p for p in (sys.executable, '/usr/bin/python3')
                       if run([p, '-c', 'import matplotlib']).returncode == 0), None)
        self.assertIsNotNone(python, 'no python3 with matplotlib: apt-get install python3-matplotlib')
        with tempfile.TemporaryDirectory() as d:
            for trace in ('trace.json', 'trace-crashed.json'):
                out = Path(d) / (trace + '.png')
                r = run([python, REPORT, 'plot', str(DATA / trace), str(out)])
                self.assertEqual(r.returncode, 0, r.stderr)
                self.assertEqual(out.read_bytes()[:8], b'\x89PNG\r\n\x1a\n')


class Errors(unittest.TestCase):
    def check(self, args, *words):
        r = report(*args)
        self.assertEqual(r.returncode, 2, r.stdout + r.stderr)
        self.assertNotIn('Traceback', r.stderr)
        self.assertRegex(r.stderr, r'(?m)^gpumem-report( \w+)?: ')   # after argparse's usage line
        for w in words:
            self.assertIn(w, r.stderr)

    def test_bad_input(self):
        d = lambda name: str(DATA / name)
        self.check(['summary', d('missing.json')], 'cannot read', 'missing.json')
        self.check(['summary', d('report.txt')], 'report.txt: not valid JSON', '--format json')
        self.check(['summary', d('not-a-report.json')], 'not a gpumem report', "'chrome-trace'")
        self.check(['summary', d('report-v2.json')], 'version 2 is not supported')
        self.check(['diff', d('report-old.json'), d('report-v2.json')], 'version 2')
        self.check(['diff', d('trace.json'), d('report-new.json')], 'trace.json: expected a JSON report')
        self.check(['plot', d('report-new.json'), os.devnull], 'expected a trace')
        self.check(['summary', str(DATA)], 'cannot read')
        self.check(['bogus'])
        self.check(['diff', d('report-old.json')])

    def test_malformed_content(self):
        with tempfile.TemporaryDirectory() as d:
            cases = {'empty.json': ('', 'empty file'),
                     'fields.json': ('{"format": "gpumem-report", "version": 1, "pid": 1}\n', "missing field"),
                     'garbled.json': ('{"format": "gpumem-report", "version": 1,\n', 'not valid JSON at line'),
                     'mid.json': ('[\n{"ph": "C"\n{"ph": "i"}\n]\n', 'not valid JSON at line 3'),
                     'event.json': ('[\n{"ph":"C","ts":1,"name":"device 0 memory","args":{}}\n]\n', "'allocated'")}
            for name, (text, words) in cases.items():
                Path(d, name).write_text(text)
                self.check(['summary', str(Path(d, name))], name, words)


class EndToEnd(unittest.TestCase):
    """The demo under the launcher, with the options the C side reads (GPUMEM_REPORT_FORMAT, ...)."""

    def demo(self, d, *opts):
        r = gpumem('--limit', '64MiB', '--format', 'json', '--report', f'{d}/report.%p.json',
                   '--trace', f'{d}/trace.%p.json', *opts, DEMO)
        self.assertNotIn('unknown variable GPUMEM_', r.stderr)
        files = {p.name.split('.')[0]: p for p in Path(d).glob('*.*.json')}
        self.assertEqual(sorted(files), ['report', 'trace'], r.stderr)
        return r, files

    def test_report_and_trace(self):
        with tempfile.TemporaryDirectory() as d:
            r, files = self.demo(d)
            self.assertEqual(r.returncode, 0, r.stderr)
            s = report('summary', str(files['report']), str(files['trace']))
            self.assertEqual(s.returncode, 0, s.stderr)
            self.assertIn('leaked: 5245880 bytes (5.0 MiB) in 2 allocation(s)', s.stdout)
            self.assertIn('limit rejection 1', s.stdout)
            self.assertRegex(s.stdout, r'device 0: peak allocated \d+ bytes')

    def test_diff_of_two_runs(self):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            ra, rb = self.demo(a)[1]['report'], self.demo(b)[1]['report']
            r = report('diff', str(ra), str(rb))
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_suppressions_and_leak_exitcode(self):
        with tempfile.TemporaryDirectory() as d:
            self.assertEqual(self.demo(d, '--leak-exitcode', '9')[0].returncode, 9)
        with tempfile.TemporaryDirectory() as d:
            supp = Path(d, 'demo.supp')
            supp.write_text('# the demo leaks on purpose\nleak:gpumem-demo\n')
            r, files = self.demo(d, '--leak-exitcode', '9', '--suppressions', str(supp))
            self.assertEqual(r.returncode, 0, r.stderr)
            s = report('summary', str(files['report'])).stdout
            self.assertIn('leaked: 0 bytes', s)
            self.assertIn('suppressed: 5245880 bytes in 2 allocation(s)', s)


if __name__ == '__main__':
    names = sys.argv[1:] or None
    prog = unittest.main(argv=[sys.argv[0], *(names or [])], exit=False, verbosity=2)
    res = prog.result
    sys.exit(0 if res.wasSuccessful() and not res.skipped else 1)
