"""The driver of tests/gpu/bench_frameworks.py with trivial children (--fake: made-up figures, no
framework, no GPU): modes alternate with the order rotated every round, medians, spread and
ratios are those of the figures, a result that differs or a child that fails fails the run, a
missing framework is a SKIP; and without a CUDA device the real driver exits 77."""
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import unittest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCH = ROOT / 'tests' / 'gpu' / 'bench_frameworks.py'
TORCH = ['torch-caching', 'torch-nocache', 'torch-nocache-shim-strict', 'torch-nocache-shim-fast',
         'torch-caching-shim']


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ('OUT', 'GPU_CHECK_REQUIRE_GPU', 'LD_PRELOAD') and not k.startswith('GPUMEM_')}
    env.update(extra)
    return env


class Driver(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.work = pathlib.Path(self.tmp.name)

    def tearDown(self):
        self.tmp.cleanup()

    def bench(self, *args, env=None):
        r = subprocess.run([sys.executable, str(BENCH), '--work', str(self.work / 'children'), *args],
                           capture_output=True, text=True, env=env or clean_env(), timeout=300)
        return r.returncode, r.stdout + r.stderr

    def test_five_rounds(self):
        js = self.work / 'f.json'
        rc, out = self.bench('--fake', '--rounds', '5', '--json', str(js))
        self.assertEqual(rc, 0, out)
        self.assertTrue(out.rstrip().endswith('bench_frameworks: OK'), out)
        # Each round runs every mode once, the order rotated by one each round.
        rounds = re.findall(r'^round (\d): (.*) \(ms/step\)$', out, re.M)
        self.assertEqual([n for n, _ in rounds], ['1', '2', '3', '4', '5'])
        for i, (_, line) in enumerate(rounds):
            order = [m.rsplit(' ', 1)[0] for m in line.split(', ')]
            k = i % len(TORCH)
            self.assertEqual(order[:5], TORCH[k:] + TORCH[:k], line)
            self.assertEqual(order[5:], ['jax', 'jax-shim'] if i % 2 == 0 else ['jax-shim', 'jax'], line)
        # Round r's figures are the base times (1 + r/100): the median is round 3's, the spread
        # rounds 1 and 5.
        self.assertRegex(out, r'\n  torch-caching +27\.54  27\.00-28\.08 ')
        self.assertRegex(out, r'\n  torch-nocache +104\.04  102\.00-106\.08 ')
        self.assertRegex(out, r'\n  jax-shim +5\.15  5\.05-5\.25 ')
        self.assertIn('ratio_fast_vs_caching=0.9000 goal=1.0 met=no range=0.9000-0.9000', out)
        self.assertIn('ratio_strict_vs_nocache=2.5500 goal=2.5 met=yes', out)
        self.assertIn('ratio_caching_shim_vs_caching=0.9926 goal=0.98 met=yes', out)
        self.assertIn('ratio_jax_shim_vs_jax=0.9901 goal=0.98 met=yes', out)
        self.assertRegex(out, r'strict - fast = 10\.20 ms/step; strict runs at 75 % .* 160 frees '
                              r'\(barriers\) per step, 63\.7 us each')
        self.assertIn('identical: torch-nocache = torch-nocache-shim-strict = torch-nocache-shim-fast', out)
        doc = json.loads(js.read_text())
        self.assertEqual(doc['modes']['torch-caching']['per_round'], [27.0, 27.27, 27.54, 27.81, 28.08])
        self.assertEqual(doc['modes']['jax']['rounds'], [0, 1, 2, 3, 4])
        self.assertAlmostEqual(doc['ratios']['strict_vs_nocache']['median'], 2.55)
        self.assertFalse(doc['ratios']['fast_vs_caching']['met'])
        self.assertEqual(doc['failed'], {})
        self.assertEqual(len(list((self.work / 'children').glob('r*-*.out'))), 35)

    def test_variants_and_a_subset_of_modes(self):
        js = self.work / 'v.json'
        rc, out = self.bench('--fake', '--rounds', '2', '--json', str(js), '--modes',
                             'torch-caching,torch-nocache-shim-fast,fast-big',
                             '--variant', 'fast-big=torch-nocache-shim-fast:GPUMEM_FENCE_BATCH=64GiB,GPUMEM_X=1')
        self.assertEqual(rc, 0, out)
        rounds = re.findall(r'^round \d: (.*) \(ms/step\)$', out, re.M)
        self.assertEqual(len(rounds), 2, out)
        for line in rounds:
            self.assertEqual(sorted(m.rsplit(' ', 1)[0] for m in line.split(', ')),
                             ['fast-big', 'torch-caching', 'torch-nocache-shim-fast'], line)
        # A variant belongs to its mode's group: it must compute what the mode computes.
        self.assertIn('identical: torch-nocache-shim-fast = fast-big', out)
        self.assertRegex(out, r'\n  fast-big +30\.15  30\.00-30\.30 ')
        doc = json.loads(js.read_text())
        self.assertEqual(sorted(doc['modes']), ['fast-big', 'torch-caching', 'torch-nocache-shim-fast'])
        env = doc['modes']['fast-big']['env']
        self.assertEqual((env['GPUMEM_FENCE_BATCH'], env['GPUMEM_X'], env['GPUMEM_FREE_SYNC']), ('64GiB', '1', '0'))
        self.assertEqual(doc['modes']['fast-big']['variant_of'], 'torch-nocache-shim-fast')
        rc, out = self.bench('--fake', '--variant', 'fast-big=torch-nocache-shim-fast:fence=1')
        self.assertEqual(rc, 2, out)
        self.assertIn("--variant fast-big=torch-nocache-shim-fast:fence=1: 'fence=1' is not VAR=VALUE", out)
        rc, out = self.bench('--fake', '--variant', 'x=torch-fast')
        self.assertEqual(rc, 2, out)
        self.assertIn("'torch-fast' is not one of the modes (torch-caching, ", out)
        rc, out = self.bench('--fake', '--modes', 'torch-caching,jaxx')
        self.assertEqual(rc, 2, out)
        self.assertIn("--modes: 'jaxx' is not a mode", out)

    def test_a_process_on_a_slow_host_is_normalized_by_its_launch_time(self):
        # Every fast-mode process lands 1.5x slow (its step and its kernel launches alike): the
        # raw ratio shows the host, the normalized one the modes' own 0.90.
        js = self.work / 'n.json'
        rc, out = self.bench('--fake', '--rounds', '3', '--frameworks', 'torch', '--json', str(js),
                             '--fake-slow-host', 'torch-nocache-shim-fast')
        self.assertEqual(rc, 0, out)
        self.assertIn('ratio_fast_vs_caching=0.6000 goal=1.0 met=no', out)
        self.assertIn('normalized_fast_vs_caching=0.9000 range=0.9000-0.9000', out)
        self.assertIn('normalized_strict_vs_nocache=2.5500', out)
        self.assertRegex(out, r'\n  torch-nocache-shim-fast +45\.45 .* launch 6\.00 us \[6\.00-6\.00\]')
        self.assertRegex(out, r'\n  torch-caching +27\.27 .* launch 4\.00 us')
        doc = json.loads(js.read_text())
        self.assertEqual(doc['modes']['torch-caching']['launch_us'], [4.0, 4.0, 4.0])
        self.assertAlmostEqual(doc['normalized_ratios']['fast_vs_caching']['median'], 0.9)
        self.assertNotIn('jax_shim_vs_jax', doc['normalized_ratios'])  # JAX's children do not measure it

    def test_json_goes_to_out(self):
        rc, out = self.bench('--fake', '--rounds', '1', env=clean_env(OUT=str(self.work / 'out')))
        self.assertEqual(rc, 0, out)
        self.assertEqual(json.loads((self.work / 'out' / 'frameworks.json').read_text())['rounds'], 1)

    def test_the_shim_changing_a_loss_fails(self):
        rc, out = self.bench('--fake', '--rounds', '2', '--fake-mismatch', 'torch-caching-shim')
        self.assertEqual(rc, 1, out)
        self.assertIn('FAIL computation differs: torch-caching-shim computed differently from torch-caching: '
                      'loss 2.5000001', out)
        self.assertIn('bench_frameworks: FAIL (0 modes failed, 1 results differ)', out)

    def test_a_mode_varying_over_rounds_fails(self):
        rc, out = self.bench('--fake', '--rounds', '2', '--fake-vary', 'jax')
        self.assertEqual(rc, 1, out)
        self.assertIn('jax: 2 different results over its rounds (the framework itself is not deterministic', out)

    def test_a_failing_mode_fails_and_the_others_go_on(self):
        rc, out = self.bench('--fake', '--rounds', '3', '--fake-fail', 'torch-nocache-shim-strict')
        self.assertEqual(rc, 1, out)
        self.assertIn('FAIL torch-nocache-shim-strict: rc=3: fake failure', out)
        self.assertEqual(len(list((self.work / 'children').glob('r*-torch-nocache-shim-strict.out'))), 1)
        self.assertIn('ratio_fast_vs_caching=0.9000', out)
        self.assertNotIn('ratio_strict_vs_nocache', out)

    def test_a_missing_framework_is_a_skip_line(self):
        rc, out = self.bench('--fake', '--rounds', '2', '--fake-skip', 'jax')
        self.assertEqual(rc, 0, out)
        self.assertIn('SKIP jax: jax not installed (fake)', out)
        self.assertNotIn('ratio_jax_shim_vs_jax', out)
        rc, out = self.bench('--fake', '--rounds', '2', '--fake-skip', 'torch,jax')
        self.assertEqual(rc, 77, out)
        self.assertIn('SKIP: bench_frameworks: no framework could run here', out)

    def test_no_device_is_a_skip(self):
        # Without LD_LIBRARY_PATH (the fake driver may be on the caller's): the machine's libcuda.
        env = {k: v for k, v in clean_env().items() if k != 'LD_LIBRARY_PATH'}
        probe = subprocess.run([sys.executable, '-c', 'import sys; sys.path.insert(0, sys.argv[1]); '
                                'import bench_frameworks as b; print(b.cuda_device_count())', str(BENCH.parent)],
                               capture_output=True, text=True, env=env, check=True)
        if int(probe.stdout) > 0:
            self.skipTest('a CUDA device is here: the gpu-bench suite runs the real driver')
        rc, out = self.bench(env=env)
        self.assertEqual(rc, 77, out)
        self.assertIn('SKIP: bench_frameworks: no CUDA device here', out)
        rc, out = self.bench(env=dict(env, GPU_CHECK_REQUIRE_GPU='1'))
        self.assertEqual(rc, 1, out)
        self.assertIn('bench_frameworks: FAIL: no CUDA device (GPU_CHECK_REQUIRE_GPU=1)', out)


class Pieces(unittest.TestCase):
    """The parts of the real path that run without a framework: each mode's environment, the
    gpumem statistics reader (the build's shim on the fake driver), a stub framework's SKIP."""

    def setUp(self):
        sys.path.insert(0, str(BENCH.parent))
        import bench_frameworks
        self.b = bench_frameworks

    def test_mode_environments(self):
        os.environ.update(GPUMEM_LIMIT='1GiB', PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True',
                          XLA_PYTHON_CLIENT_PREALLOCATE='false', XLA_FLAGS='--xla_dump_to=/tmp/x')
        try:
            base = self.b.clean_env()
        finally:
            for k in ('GPUMEM_LIMIT', 'PYTORCH_CUDA_ALLOC_CONF', 'XLA_PYTHON_CLIENT_PREALLOCATE', 'XLA_FLAGS'):
                del os.environ[k]
        a = self.b.parse(['--shim', '/x/libgpumem_shim.so'])
        env = {m: self.b.mode_env(a, base, m) for m in self.b.MODES}
        keys = ('LD_PRELOAD', 'PYTORCH_NO_CUDA_MEMORY_CACHING', 'GPUMEM_FREE_SYNC')
        got = {m: tuple(e.get(k) for k in keys) for m, e in env.items()}
        shim = '/x/libgpumem_shim.so'
        self.assertEqual(got, {
            'torch-caching': (None, None, None), 'torch-nocache': (None, '1', None),
            'torch-nocache-shim-strict': (shim, '1', '1'), 'torch-nocache-shim-fast': (shim, '1', '0'),
            'torch-caching-shim': (shim, None, None), 'jax': (None, None, None), 'jax-shim': (shim, None, None)})
        for m, e in env.items():  # the caller's settings never reach a child
            self.assertNotIn('GPUMEM_LIMIT', e, m)
            self.assertNotIn('PYTORCH_CUDA_ALLOC_CONF', e, m)
            self.assertNotIn('XLA_PYTHON_CLIENT_PREALLOCATE', e, m)
            self.assertEqual(e['CUBLAS_WORKSPACE_CONFIG'], ':4096:8', m)
        self.assertEqual(env['jax']['XLA_FLAGS'], '--xla_dump_to=/tmp/x --xla_gpu_autotune_level=0')

    def test_frees_reader_on_the_fake_driver(self):
        shim, fake = os.environ.get('TOOLS_BUILD_SHIM'), os.environ.get('TOOLS_FAKECUDA')
        if not shim or not fake:
            self.skipTest('run by meson (tools_bench_frameworks): needs the build shim and the fake driver')
        code = (
            'import ctypes, sys; sys.path.insert(0, sys.argv[1]); import bench_frameworks as b\n'
            'read = b.gpumem_stats_reader(); n0 = read()["frees"]\n'
            'cu = ctypes.CDLL("libcuda.so.1"); assert cu.cuInit(0) == 0\n'
            'd, ctx, p = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()\n'
            'assert cu.cuDeviceGet(ctypes.byref(d), 0) == 0\n'
            'assert cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), d) == 0 and cu.cuCtxSetCurrent(ctx) == 0\n'
            'for i in range(3):\n'
            '    assert cu.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(1 << 20)) == 0\n'
            '    assert cu.cuMemFree_v2(p) == 0\n'
            'st = read()\n'
            'print("frees", st["frees"] - n0)\n'
            'print("fences", st["fences"] > 0, "waits", st["fence_waits"] >= 0)\n'
            'print(b.shim_per_step(dict(st, frees=st["frees"] - 6, fences=0), st, 2))\n')
        env = dict(os.environ, LD_PRELOAD=shim, LD_LIBRARY_PATH=fake, GPUMEM_REPORT='off', GPUMEM_FREE_SYNC='0',
                   GPUMEM_FENCE_BATCH='0')
        r = subprocess.run([sys.executable, '-c', code, str(BENCH.parent)], capture_output=True, text=True,
                           env=env, timeout=60)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn('frees 3', r.stdout)
        # Fast mode with no batch fences at every miss: the counters the per-step line reads.
        self.assertIn('fences True waits True', r.stdout)
        self.assertRegex(r.stdout, r'frees:3\.00,pool_misses:0\.00,fences:\d+\.\d\d,fence_waits:0\.00,'
                                   r'reserved_peak_mib:\d+')
        r = subprocess.run([sys.executable, '-c', 'import sys; sys.path.insert(0, sys.argv[1]); '
                            'import bench_frameworks as b; print(b.gpumem_stats_reader())', str(BENCH.parent)],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.stdout.strip(), 'None', r.stderr)  # no shim: no reader

    def test_a_stub_framework_that_cannot_start_is_a_skip(self):
        shim, fake = os.environ.get('TOOLS_BUILD_SHIM'), os.environ.get('TOOLS_FAKECUDA')
        if not shim or not fake:
            self.skipTest('run by meson (tools_bench_frameworks): needs the build shim and the fake driver')
        with tempfile.TemporaryDirectory() as tmp:
            stub = pathlib.Path(tmp) / 'stub'
            (stub / 'torch').mkdir(parents=True)
            (stub / 'torch' / '__init__.py').write_text('raise ImportError("stub torch")\n')
            env = clean_env(LD_LIBRARY_PATH=fake, PYTHONPATH=str(stub))  # the fake driver: one device
            r = subprocess.run([sys.executable, str(BENCH), '--shim', shim, '--frameworks', 'torch',
                                '--rounds', '2', '--work', tmp + '/w'], capture_output=True, text=True,
                               env=env, timeout=120)
        out = r.stdout + r.stderr
        self.assertEqual(r.returncode, 77, out)
        self.assertIn('SKIP torch: cannot import torch (stub torch)', out)
        self.assertIn('SKIP: bench_frameworks: no framework could run here', out)


if __name__ == '__main__':
    unittest.main()
