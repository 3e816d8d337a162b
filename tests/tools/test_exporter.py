"""gpumem-exporter and `gpumem-report top` against a live group (run by meson: tests/api/meson.build,
test tools_exporter).

Two members (tests/api/shared_child under the shim, on the fake driver) hold 40 and 10 MiB in one
GPUMEM_SHARED region; the exporter serves /metrics on loopback and the scrape is parsed with
prometheus_client's own parser; the textfile mode writes the same; `gpumem-report top` shows the
members, once and in a real terminal (tmux). Paths from the environment: TOOLS_EXPORTER,
TOOLS_REPORT, TOOLS_SHARED_CHILD, TOOLS_SHIM, TOOLS_LIBGPUMEM.
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

EXPORTER, REPORT, CHILD, SHIM, LIB = (os.environ[v] for v in (
    'TOOLS_EXPORTER', 'TOOLS_REPORT', 'TOOLS_SHARED_CHILD', 'TOOLS_SHIM', 'TOOLS_LIBGPUMEM'))
MiB = 1 << 20


def python_with_prometheus():
    """The python3 that has prometheus_client (scripts/setup-deps.sh installs Debian's)."""
    for p in (sys.executable, '/usr/bin/python3'):
        if subprocess.run([p, '-c', 'import prometheus_client'], capture_output=True).returncode == 0:
            return p
    raise AssertionError('no python3 with prometheus_client: apt-get install python3-prometheus-client')


PYTHON = python_with_prometheus()
if PYTHON != sys.executable:  # this test parses the scrape with prometheus_client too
    os.execv(PYTHON, [PYTHON] + sys.argv)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Group:
    """Members of one region, each holding `sizes` MiB until the group is closed."""

    def __init__(self, sizes):
        self.dir = tempfile.mkdtemp(prefix='gpumem-exporter-')
        self.region = os.path.join(self.dir, 'budget')
        env = dict(os.environ, LD_PRELOAD=SHIM, GPUMEM_SHARED=self.region, GPUMEM_LIMIT='64MiB',
                   GPUMEM_MAX_CACHED='0', GPUMEM_PUBLISH_INTERVAL_MS='50', GPUMEM_REPORT='off')
        self.members = []
        for mib in sizes:
            p = subprocess.Popen([CHILD, f'alloc:{mib}M', 'wait'], env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
            assert p.stdout.readline().strip() == 'alloc 0'
            assert p.stdout.readline().strip() == 'waiting'
            self.members.append(p)
        time.sleep(0.3)  # a few publication rounds

    def close(self):
        for p in self.members:
            p.communicate('go\n', timeout=20)
        shutil.rmtree(self.dir, ignore_errors=True)


def parse(text):
    from prometheus_client.parser import text_string_to_metric_families
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(families, name):
    return [s for s in families[name].samples if s.name == name or s.name == name + '_total']


class Exporter(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.group = Group([40, 10])

    @classmethod
    def tearDownClass(cls):
        cls.group.close()

    def check_metrics(self, families):
        pids = {str(p.pid) for p in self.group.members}
        reserved = {s.labels['pid']: s.value for s in samples(families, 'gpumem_process_reserved_bytes')}
        self.assertEqual(set(reserved), pids)
        self.assertEqual(sorted(reserved.values()), [10 * MiB, 40 * MiB])
        allocated = {s.labels['pid']: s.value for s in samples(families, 'gpumem_process_allocated_bytes')}
        self.assertEqual(sorted(allocated.values()), [10 * MiB, 40 * MiB])
        for s in samples(families, 'gpumem_process_reserved_bytes'):
            self.assertEqual(s.labels['command'], 'shared_child')
            self.assertEqual(s.labels['device'], '0')
            self.assertTrue(s.labels['uuid'].startswith('GPU-'), s.labels)
        self.assertEqual([s.value for s in samples(families, 'gpumem_group_used_bytes')], [50 * MiB])
        self.assertEqual([s.value for s in samples(families, 'gpumem_group_limit_bytes')], [64 * MiB])
        self.assertEqual([s.value for s in samples(families, 'gpumem_group_members')], [2])
        self.assertEqual(families['gpumem_process_allocations'].type, 'counter')
        self.assertEqual(families['gpumem_process_reserved_bytes'].type, 'gauge')
        self.assertTrue(families['gpumem_process_reserved_bytes'].documentation)

    def test_scrape_over_loopback(self):
        port = free_port()
        missing = os.path.join(self.group.dir, 'missing')
        srv = subprocess.Popen([PYTHON, EXPORTER, '--shared', self.group.region, '--shared', missing,
                                '--listen', f'127.0.0.1:{port}'], env=dict(os.environ, GPUMEM_LIBGPUMEM=LIB),
                               stderr=subprocess.PIPE, text=True)
        try:
            self.assertIn('serving', srv.stderr.readline())
            t0 = time.monotonic()
            text = urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=10).read().decode()
            print(f'scrape took {1e3 * (time.monotonic() - t0):.1f} ms', file=sys.stderr)
        finally:
            srv.terminate()
            srv.wait(timeout=10)
        families = parse(text)
        self.check_metrics(families)
        up = {s.labels['group']: s.value for s in samples(families, 'gpumem_region_up')}
        self.assertEqual(up, {self.group.region: 1, missing: 0})

    def test_textfile(self):
        with tempfile.TemporaryDirectory() as d:
            r = subprocess.run([PYTHON, EXPORTER, '--shared', self.group.dir, '--textfile', d, '--once'],
                               env=dict(os.environ, GPUMEM_LIBGPUMEM=LIB), capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr)
            with open(os.path.join(d, 'gpumem.prom')) as f:
                self.check_metrics(parse(f.read()))

    def test_bad_input(self):
        for args, words in ((['--listen', 'nowhere'], "--listen 'nowhere' is not valid"),
                            (['--textfile', '/nonexistent/dir', '--once'], 'is not a directory')):
            r = subprocess.run([PYTHON, EXPORTER, '--shared', self.group.region] + args,
                               env=dict(os.environ, GPUMEM_LIBGPUMEM=LIB), capture_output=True, text=True)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn(words, r.stderr)

    def test_top_once(self):
        r = subprocess.run([PYTHON, REPORT, 'top', self.group.region, '--once'],
                           env=dict(os.environ, GPUMEM_LIBGPUMEM=LIB), capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        for p in self.group.members:
            self.assertIn(f'{p.pid:>8} shared_child', r.stdout)
        self.assertIn('used 50.0 MiB (78 %)', r.stdout)
        self.assertIn('40.0 MiB', r.stdout)

    def test_top_not_a_region(self):
        r = subprocess.run([PYTHON, REPORT, 'top', os.path.join(self.group.dir, 'missing'), '--once'],
                           env=dict(os.environ, GPUMEM_LIBGPUMEM=LIB), capture_output=True, text=True)
        self.assertEqual(r.returncode, 2)
        self.assertIn('cannot open it', r.stderr)

    def test_top_in_a_terminal(self):
        tmux = shutil.which('tmux')
        self.assertIsNotNone(tmux, 'tmux is needed: apt-get install tmux')
        sock = f'gpumem-top-{os.getpid()}'
        cmd = f'GPUMEM_LIBGPUMEM={LIB} {PYTHON} {REPORT} top {self.group.region} --interval 0.2'
        subprocess.run([tmux, '-L', sock, 'new-session', '-d', '-x', '160', '-y', '30', cmd], check=True)
        try:
            screen = ''
            for _ in range(50):
                time.sleep(0.1)
                screen = subprocess.run([tmux, '-L', sock, 'capture-pane', '-p'], capture_output=True, text=True).stdout
                if 'shared_child' in screen:
                    break
            for p in self.group.members:
                self.assertIn(str(p.pid), screen)
            self.assertIn('gpumem top', screen)
            subprocess.run([tmux, '-L', sock, 'send-keys', 'q'], check=True)
            for _ in range(50):
                time.sleep(0.1)
                if subprocess.run([tmux, '-L', sock, 'has-session'], capture_output=True).returncode != 0:
                    break
            else:
                self.fail('top did not quit on q')
        finally:
            subprocess.run([tmux, '-L', sock, 'kill-server'], capture_output=True)


if __name__ == '__main__':
    unittest.main(argv=sys.argv[:1], verbosity=2)
