#!/usr/bin/env python3
"""exporter_check: gpumem-exporter over a group of two PyTorch processes on the GPU.

    exporter_check.py SHIM EXPORTER LIBGPUMEM [PYTHONPATH_FOR_PROMETHEUS_CLIENT]

Starts two PyTorch processes under the shim (LD_PRELOAD=SHIM) in one group (GPUMEM_SHARED, a
fresh region; GPUMEM_LIMIT=4GiB), holding 256 MiB and 512 MiB of tensors; then runs the exporter
once in textfile mode and reads its gpumem_process_reserved_bytes and gpumem_group_used_bytes.
Prints pids_seen, the members' MiB, group_used_mib and the exporter's time; "exporter_check: OK"
when both processes are there with at least their tensors' bytes and the group's usage is their
sum.
"""
import os
import re
import subprocess
import sys
import tempfile
import time

MEMBER = r'''
import sys, torch
x = torch.empty(int(sys.argv[1]) << 20, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print("ready", flush=True)
sys.stdin.readline()
'''


def main():
    shim, exporter, lib = sys.argv[1:4]
    extra = sys.argv[4] if len(sys.argv) > 4 else ''
    work = tempfile.mkdtemp(prefix='gpumem-exporter-check-')
    region = os.path.join(work, 'budget')
    env = dict(os.environ, LD_PRELOAD=shim, GPUMEM_SHARED=region, GPUMEM_LIMIT='4GiB',
               GPUMEM_PUBLISH_INTERVAL_MS='100', GPUMEM_REPORT='off')
    members = []
    for mib in (256, 512):
        p = subprocess.Popen([sys.executable, '-c', MEMBER, str(mib)], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        if p.stdout.readline().strip() != 'ready':
            print('exporter_check: a member did not start')
            return 1
        members.append((p, mib))
    time.sleep(0.5)  # a few publication rounds
    xenv = dict(os.environ, GPUMEM_LIBGPUMEM=lib)
    if extra:
        xenv['PYTHONPATH'] = extra + os.pathsep + xenv.get('PYTHONPATH', '')
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, exporter, '--shared', region, '--textfile', work, '--once'],
                       env=xenv, capture_output=True, text=True)
    took_ms = 1e3 * (time.monotonic() - t0)
    for p, _ in members:
        p.communicate('go\n', timeout=60)
    if r.returncode != 0:
        print(f'exporter_check: the exporter failed: {r.stderr.strip()}')
        return 1
    with open(os.path.join(work, 'gpumem.prom')) as f:
        text = f.read()
    reserved = {int(m.group(1)): float(m.group(2)) for m in re.finditer(
        r'^gpumem_process_reserved_bytes\{[^}]*pid="(\d+)"[^}]*\} (\S+)$', text, re.M)}
    used = [float(v) for v in re.findall(r'^gpumem_group_used_bytes\{[^}]*\} (\S+)$', text, re.M)]
    seen = [pid for pid in reserved if pid in {p.pid for p, _ in members}]
    print(f'pids_seen={len(seen)}')
    for p, mib in members:
        print(f'member_{mib}_reserved_mib={reserved.get(p.pid, 0) / 2**20:.0f}')
    print(f'group_used_mib={used[0] / 2**20 if used else -1:.0f}')
    print(f'exporter_ms={took_ms:.0f}')
    ok = (len(seen) == 2 and all(reserved.get(p.pid, 0) >= mib << 20 for p, mib in members)
          and used and used[0] == sum(reserved[p.pid] for p, _ in members))
    os.unlink(region)
    os.unlink(os.path.join(work, 'gpumem.prom'))
    os.rmdir(work)
    print(f'exporter_check: {"OK" if ok else "FAILED"}')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
