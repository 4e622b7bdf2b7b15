import json, sys
def load(n): return [r['answer_nll'] for r in json.load(open(n))['results']]
for m, sp in (('mha', '0.75'), ('gqa', '0.5')):
    a = load(f'{m}_pattern-gate-all-labels_{sp}.json')
    for other in ('gate', 'heuristic'):
        b = load(f'{m}_pattern-{other}_{sp}.json')
        d = [y - x for x, y in zip(a, b)]
        print(m, 'gate-all-labels vs', other, 'mean %+.4f' % (sum(d) / len(d)),
              'lower in', sum(x > 0 for x in d), 'higher in', sum(x < 0 for x in d), 'of', len(d))
