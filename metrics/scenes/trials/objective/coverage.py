"""Which patches do the scenes labels keep, by question type, with each label objective?
Over all 1200 samples: the share whose every needed object (one holding a recorded `relevant`
patch) has its anchor (first patch) / any patch in the label, the label's share of relevant
patches and of background ones; then the share of the answer-objective label that the
distill label keeps too. Needs `bash metrics/scenes/trials/objective/run.sh` first.
  .venv/bin/python metrics/scenes/trials/objective/coverage.py > coverage.log"""
import json, collections, os, pandas as pd
WORK = os.environ.get("WORK", "/tmp/objective")
d = pd.read_parquet("data/scenes/prepared/samples.parquet")
for name, path in [("answer", "data/scenes/labels/labels.parquet"), ("distill", WORK + "/labels_distill.parquet")]:
    lab = pd.read_parquet(path).set_index("sample_id")
    st = collections.defaultdict(collections.Counter)
    for r in d.itertuples():
        m = json.loads(r.meta); rel = set(m["relevant"])
        need = [o for o in m["objects"] if rel & set(o["patches"])]
        S = set(lab.loc[r.id].kept.tolist()); q = m["qtype"]
        objp = set(p for o in m["objects"] for p in o["patches"])
        st[q]["n"] += 1
        st[q]["anchor"] += all(min(o["patches"]) in S for o in need)
        st[q]["any"] += all(S & set(o["patches"]) for o in need)
        st[q]["relevant_share"] += len(S & rel) / len(S)
        st[q]["background_share"] += len(S - objp) / len(S)
    print(name, {q: {k: round(v / c["n"], 3) for k, v in c.items() if k != "n"} | {"n": c["n"]} for q, c in sorted(st.items())})
a = pd.read_parquet("data/scenes/labels/labels.parquet").set_index("sample_id"); b = pd.read_parquet("" + WORK + "/labels_distill.parquet").set_index("sample_id")
print("overlap", sum(len(set(a.kept[i]) & set(b.kept[i])) / len(a.kept[i]) for i in a.index) / len(a))
