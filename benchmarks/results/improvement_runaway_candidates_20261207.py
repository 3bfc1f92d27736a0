# Analysis of the 21:35 probe run (revision texts logged by a temporary debug line): where a loop check would
# stop each revision. python benchmarks/results/improvement_runaway_candidates_20261207.py <server log>
import sys
import json,re,collections
LOOP = re.compile(r"(.{16,200}?)\1\1", re.S)
revs=[]
for line in open(sys.argv[1] if len(sys.argv) > 1 else "probe.log"):
    if 'REVISION {' in line:
        revs.append(json.loads(line.split('REVISION ',1)[1]))
def first_loop_end(text):
    # earliest end position of a 3x repeat: scan prefixes in 64-char steps
    for end in range(64, len(text)+64, 64):
        if LOOP.search(text[max(0,end-800):end]): return min(end,len(text))
    return None
tot=0; saved=0; n=0; fp=[]
for r in revs:
    raw=r['raw']; e=first_loop_end(raw)
    if e is not None:
        n+=1; saved += len(raw)-e; tot+=len(raw)
        if r['problem'] is None and len(raw) < 1500: fp.append(raw)
print("revisions with a loop:", n, "chars after detection:", saved, "of", sum(len(r['raw']) for r in revs))
long=[r for r in revs if len(r['raw'])>1500]
print("long:", len(long), "with loop:", sum(first_loop_end(r['raw']) is not None for r in long))
for r in long:
    e=first_loop_end(r['raw'])
    print(len(r['raw']), e, str(r['problem'])[:30], repr(r['raw'][(e or 0)-120:(e or 0)])[:140] if e else repr(r['raw'][-100:]))
print("loops in shorter, check-passing revisions:", len(fp))
for t in fp[:5]: print(repr(t[:400]))
print("=== variants")
drafts = list({r['previous'] for r in revs})
for pat in [r"(.{16,200}?)\1\1", r"(.{24,300}?)\1", r"(.{32,300}?)\1", r"(.{12,200}?)\1\1"]:
    L = re.compile(pat, re.S)
    def fl(text):
        for end in range(64, len(text)+64, 64):
            if L.search(text[max(0,end-900):end]): return min(end,len(text))
        return None
    hits=[fl(r['raw']) for r in revs]
    saved=sum(len(r['raw'])-h for r,h in zip(revs,hits) if h is not None)
    dh=[d for d in drafts if fl(d) is not None]
    print(pat, "revisions hit", sum(h is not None for h in hits), "chars saved", saved, "drafts hit", len(dh), "of", len(drafts))
    for d in dh[:3]:
        m=L.search(d); print("   draft hit:", repr(d[max(0,m.start()-60):m.end()+20])[:260])
