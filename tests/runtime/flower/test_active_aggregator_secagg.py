"""An active aggregator on the Flower runtime, attacks (d)-(f): equivocated survivor lists,
altered or substituted RESULTs, replayed sessions.

Everything runs through the real :class:`Coordinator` and :class:`MarketWorker`: the malicious
side is a coordinator subclass that keeps its aggregator's signing key (so it can sign what it
substitutes, as a malicious aggregator can) plus a message-rewriting shim between the
coordinator and the workers. The shim records every reply; a market "reveals nothing" when no
reply of a secret-bearing stage (the masking UNMASK stage: shares) leaves it, and "refuses" a
result when its pipeline never receives the sum.
"""

from __future__ import annotations

import pytest

from fedmm_secure.errors import AbortError, ProtocolError
from fedmm_secure.federation.fedmm.protocol import SumRequest
from fedmm_secure.runtime.flower.coordinator import Coordinator, InProcessLinks
from fedmm_secure.runtime.flower.wire import pack_with_header, unpack_with_header
from fedmm_secure.runtime.flower.worker import MarketRules, MarketWorker
from fedmm_secure.secagg.codec import decode_envelope
from fedmm_secure.secagg.masking import AGREE, CONSISTENCY, NONCE, RESULT, UNMASK
from fedmm_secure.secagg.masking.wire import (pack_ids, pack_items, pack_sections, sign_message,
                                              unpack_sections)
from fedmm_secure.workflows.flower_local import tiny_flower_config

LENGTH = 24
FAILED = (AbortError, ProtocolError)


def _cfg(markets: int, secagg: str = "masking"):
    return tiny_flower_config(markets=markets, rounds=1, secagg=secagg, seed=5)


class Malicious(Coordinator):
    """The project's coordinator, holding on to its aggregator endpoint (its signing key) and to
    every round's context; ``wrap`` may replace the honest server round it drives."""

    def __init__(self, *, rounds: int = 1, wrap=None, **kw) -> None:
        kw.setdefault("workload", {"name": "secure-sum", "length": LENGTH, "rounds": rounds})
        super().__init__(stage_timeout=1, step_timeout=60, **kw)
        self.aggregator = None
        self.ctx: dict[int, object] = {}
        self.wrap = wrap

    def _sum(self, aggregator, headers):
        if self.aggregator is None:
            self.aggregator, begin = aggregator, aggregator.begin_round

            def begin_round(ctx):
                self.ctx[ctx.round_id] = ctx
                server = begin(ctx)
                return self.wrap(self, server, ctx) if self.wrap else server

            aggregator.begin_round = begin_round
        return super()._sum(aggregator, headers)

    @property
    def key(self):
        return self.aggregator._identity

    def resign(self, header: dict, msg: bytes, body: bytes, *, stage: int | None = None) -> bytes:
        """``msg`` (a masking message of the aggregator) with ``body`` instead, signed again."""
        env = decode_envelope(msg)
        return sign_message(self.key, self.ctx[header["round_id"]], env.stage if stage is None else stage,
                            "aggregator", env.payload[:32], body)


class Shim(InProcessLinks):
    """Between coordinator and workers: ``rewrite(m, stage, header, body)`` may replace what a
    market is sent; every reply is recorded (kind, and the stage of secure-aggregation replies)."""

    def __init__(self, workers, rewrite=None, after=None):
        super().__init__(workers)
        self.rewrite, self.after = rewrite, after
        self.stages = {m: [] for m in workers}          # (round, stage) of every secagg reply
        self.replies = {m: {} for m in workers}         # (round, stage) -> reply bytes
        self.kinds = {m: [] for m in workers}
        self.errors = {m: [] for m in workers}

    def send(self, m: str, header: dict, body: bytes):
        """Deliver a secure-aggregation message as the coordinator would (also for injections)."""
        return self._call(m, "secagg", pack_with_header(header, body), raw=True)

    def _call(self, m, kind, payload, raw=False):
        if kind == "secagg" and self.rewrite is not None and not raw:
            header, body = unpack_with_header(payload)
            body = self.rewrite(m, decode_envelope(body).stage, header, body)
            payload = pack_with_header(header, body)
        out = super()._call(m, kind, payload)
        self.kinds[m].append(out[0])
        if out[0] == "secagg":
            key = (unpack_with_header(payload)[0]["round_id"], _stage(out[1]))
            self.stages[m].append(key)
            self.replies[m][key] = out[1]
        elif out[0] == "error":
            self.errors[m].append(out[1].decode(errors="replace"))
        return out

    def exchange(self, messages, *, timeout):
        out = super().exchange(messages, timeout=timeout)
        if self.after is not None:
            self.after(messages, out)
        return out


def _stage(reply: bytes) -> int | None:
    try:
        return decode_envelope(reply).stage
    except ProtocolError:   # CKKS stage 0: nonce and key distribution packed together
        return None


def _names(n):
    return [f"m{i}" for i in range(n)]


def _unreleased(w: MarketWorker, round_id: int = 0) -> bool:
    """The market's pipeline is still waiting for sum ``round_id``: it did not take the result."""
    return isinstance(w._pending, SumRequest) and w._pending.round_id == round_id and w.result is None


# -- (d) different survivor lists to different markets --------------------------------------------

def test_d_flower_survivor_lists_split_with_three_colluders_are_refused():
    # Five markets that assume up to 3 of them collude with the aggregator (c = 3: t = 5). The
    # aggregator tells m3 that m4 dropped and m4 that m3 dropped; with the colluders' shares
    # that would be t' = 4 shares of each honest market's two secrets. Neither signs its view.
    cfg = _cfg(5)
    rules = MarketRules(backends=frozenset({"masking"}), colluders=3)
    workers = {m: MarketWorker(market=m, rules=rules) for m in _names(5)}
    views = {"m3": ("m0", "m1", "m2", "m3"), "m4": ("m0", "m1", "m2", "m4")}

    def rewrite(m, stage, header, body):
        if stage == CONSISTENCY and m in views:
            return co.resign(header, body, pack_ids(views[m]))
        return body

    links = Shim(workers, rewrite)
    co = Malicious(cfg=cfg, run_id="d", links=links, backend_options={"colluders": 3})
    with pytest.raises(FAILED):
        co.run()
    for m in views:
        assert "threshold is 5" in links.errors[m][-1], links.errors[m]
        assert not {CONSISTENCY, UNMASK} & {s for _, s in links.stages[m]}
    assert all((0, UNMASK) not in links.stages[m] for m in workers)
    assert all(_unreleased(w) for w in workers.values())


def test_d_flower_equivocated_survivor_list_is_caught_before_any_share_is_revealed():
    # Honest markets (c = 1, t = 4 of 5). The aggregator shows m4 a survivor list without m3
    # and everyone else the full list; every market signs what it was shown (signatures only).
    # Then it asks m4 to reveal m3's mask-key share (m3 "dropped") and, to the others, m3's
    # self-mask share (m3 "survived"): with both, m3's masked input opens. m4 checks that every
    # signature it is shown covers its own list, and refuses.
    cfg = _cfg(5)
    workers = {m: MarketWorker(market=m, rules=MarketRules(backends=frozenset({"masking"})))
               for m in _names(5)}
    view = ("m0", "m1", "m2", "m4")
    sent = {}

    def rewrite(m, stage, header, body):
        if stage == CONSISTENCY and m == "m4":
            sent.update(header=header, msg=body)
            return co.resign(header, body, pack_ids(view))
        return body

    def after(messages, replies):
        if "header" not in sent or "unmask" in sent:
            return
        sigs = {m: links.replies[m][(0, CONSISTENCY)] for m in view}
        body = pack_sections(pack_items(sorted(sigs.items())), pack_ids(view), pack_ids(("m3",)))
        sent["unmask"] = links.send("m4", sent["header"], co.resign(sent["header"], sent["msg"], body,
                                                                   stage=UNMASK))

    links = Shim(workers, rewrite, after)
    co = Malicious(cfg=cfg, run_id="d2", links=links)
    with pytest.raises(FAILED):
        co.run()
    assert (0, CONSISTENCY) in links.stages["m4"]        # it signed its (false) view ...
    assert sent["unmask"][0] == "error" and "IntegrityError" in links.errors["m4"][-1]
    assert (0, UNMASK) not in links.stages["m4"]         # ... but revealed no share
    assert all((0, UNMASK) not in links.stages[m] for m in workers)
    assert all(_unreleased(w) for w in workers.values())


# -- (e) altered or substituted RESULT --------------------------------------------------------------

def _agree_from_echoes(sign_agree):
    """A server round that, once the markets have echoed the RESULT, sends them an AGREE built
    from those echoes without the honest server's check that they all confirm one result."""

    class Forging:
        def __init__(self, co, inner, ctx):
            self.co, self.inner, self.ctx, self.forged = co, inner, ctx, None

        def start(self):
            return self.inner.start()

        def handle(self, replies):
            if replies and all(_is_result_echo(r) for r in replies.values()):
                self.forged = tuple(sorted(replies))
                return {m: sign_agree(self.co, self.ctx, self.sessions[m], replies) for m in replies}
            out = self.inner.handle(replies)
            self.sessions = {m: _session_of(msg) for m, msg in out.items()}
            return out

        @property
        def done(self):
            return self.forged is not None or self.inner.done

        @property
        def survivors(self):
            return self.forged or self.inner.survivors

    return lambda co, server, ctx: Forging(co, server, ctx)


def _session_of(msg: bytes) -> bytes:
    env = decode_envelope(msg)
    if env.backend == "ckks":
        from fedmm_secure.secagg.ckks.wire import unpack
        return unpack(env.payload[:-64], 2)[0]
    return env.payload[:32]


def _is_result_echo(reply: bytes) -> bool:
    from fedmm_secure.secagg.ckks.wire import RESULT as CK_RESULT
    try:
        env = decode_envelope(reply)
    except ProtocolError:   # CKKS stage 0: nonce and key distribution packed together
        return False
    return env.stage == (CK_RESULT if env.backend == "ckks" else RESULT)


def _masking_agree(co, ctx, session, echoes):
    return sign_message(co.key, ctx, AGREE, "aggregator", session, pack_items(sorted(echoes.items())))


def _ckks_agree(co, ctx, session, echoes):
    from fedmm_secure.secagg.ckks.wire import AGREE as CK_AGREE
    from fedmm_secure.secagg.ckks.wire import pack, pack_map, signed
    return signed(ctx, CK_AGREE, "aggregator", pack(session, pack_map(dict(echoes))), co.key)


@pytest.mark.parametrize("how", ["flip", "lie"])
def test_e_flower_masking_result_altered_or_shown_differently_is_not_used(how):
    # "flip": one coordinate of m1's sum changes in transit. "lie": the aggregator signs another
    # sum for m1 and then forwards every market's confirmation as the agreement. Either way no
    # market's pipeline receives a sum.
    cfg = _cfg(4)
    workers = {m: MarketWorker(market=m, rules=MarketRules(backends=frozenset({"masking"})))
               for m in _names(4)}

    def rewrite(m, stage, header, body):
        if stage != RESULT or m != "m1":
            return body
        if how == "flip":
            out = bytearray(body)
            out[-100] ^= 0x01
            return bytes(out)
        ids_raw, to_raw, vec = unpack_sections(decode_envelope(body).payload[32:-64], 3)
        other = bytearray(vec)
        other[0] ^= 0x01
        return co.resign(header, body, pack_sections(ids_raw, to_raw, bytes(other)))

    links = Shim(workers, rewrite)
    co = Malicious(cfg=cfg, run_id="e", links=links,
                   wrap=_agree_from_echoes(_masking_agree) if how == "lie" else None)
    with pytest.raises(FAILED):
        co.run()
    assert "IntegrityError" in links.errors["m1"][-1]
    if how == "lie":   # every market sees that m1 confirmed another result
        assert all("IntegrityError" in links.errors[m][-1] for m in workers)
    assert all(_unreleased(w) for w in workers.values())
    assert all("request" not in links.kinds[m][2:] for m in workers)


def test_e_flower_ckks_result_substituted_by_one_markets_upload_is_refused():
    # The aggregator returns m1's own encrypted upload as "the sum", signed, to every market (if
    # they decrypted and used it, every market would read m1's input) and forwards whatever they
    # confirm as the agreement.
    pytest.importorskip("tenseal")
    from fedmm_secure.secagg.ckks.wire import RESULT as CK_RESULT
    from fedmm_secure.secagg.ckks.wire import UPLOAD, pack, signed, unpack

    cfg = _cfg(3, "ckks")
    workers = {m: MarketWorker(market=m, rules=MarketRules(backends=frozenset({"ckks"})))
               for m in _names(3)}

    def rewrite(m, stage, header, body):
        if stage != CK_RESULT:
            return body
        session, rest = unpack(decode_envelope(body).payload[:-64], 2)
        key_id, survivors, _ = unpack(rest, 3)
        upload = decode_envelope(links.replies["m1"][(0, UPLOAD)])
        m1_ct = unpack(upload.payload[:-64], 3)[2]
        return signed(co.ctx[header["round_id"]], CK_RESULT, "aggregator",
                      pack(session, pack(key_id, survivors, m1_ct)), co.key)

    links = Shim(workers, rewrite)
    co = Malicious(cfg=cfg, run_id="e-ckks", links=links, wrap=_agree_from_echoes(_ckks_agree))
    with pytest.raises(FAILED):
        co.run()
    for m in workers:
        assert "IntegrityError" in links.errors[m][-1], links.errors[m]
        assert (0, CK_RESULT) not in links.stages[m]   # no confirmation of the substitute
    assert all(_unreleased(w) for w in workers.values())


# -- (f) replay --------------------------------------------------------------------------------------

def test_f_flower_an_identical_session_is_refused():
    # The aggregator runs a sum to the end, then starts the very same session again (same run id,
    # cohort, round, label; the seeded pipeline would compute the same inputs), this time
    # claiming m3 dropped after uploading: the difference of the two sums is m3's input. Every
    # market has already taken part in that run and refuses at hello, before computing anything.
    cfg = _cfg(4)
    workers = {m: MarketWorker(market=m, rules=MarketRules(backends=frozenset({"masking"})))
               for m in _names(4)}
    links = Shim(workers)
    first = Malicious(cfg=cfg, run_id="f", links=links).run()
    assert all(v["max_abs_error"] < 1e-6 for v in first["markets"].values())
    replay = Shim(workers, lambda m, stage, header, body: body)
    for run_id in ("f", "f-again"):   # a fresh run id over the same inputs is no better
        with pytest.raises(AbortError, match="no market answered hello"):
            Malicious(cfg=cfg, run_id=run_id, links=replay).run()
    for m in workers:
        assert replay.kinds[m] == ["error", "error"]
        assert all("PolicyError" in e and "already took part" in e for e in replay.errors[m])


def test_f_flower_an_earlier_sums_messages_are_refused_in_the_next_sum():
    # Two sums in one run. In the second, the aggregator opens m0's round with the first sum's
    # signed NONCE request (its header rewritten to the second sum), then feeds m0 the first
    # sum's ADVERTISE request (nonces of the first session) in place of the genuine one.
    cfg = _cfg(3)
    workers = {m: MarketWorker(market=m, rules=MarketRules(backends=frozenset({"masking"})))
               for m in _names(3)}
    seen: dict = {}

    def rewrite(m, stage, header, body):
        seen.setdefault((m, header["round_id"], stage), body)
        if m == "m0" and header["round_id"] == 1 and stage in (NONCE, NONCE + 1):
            old = seen[(m, 0, stage)]
            if stage == NONCE and not seen.get("tried"):
                seen["tried"] = True
                refused = links.send(m, header, old)
                assert refused[0] == "error" and workers[m]._round is None
            elif stage == NONCE + 1:
                return old
        return body

    links = Shim(workers, rewrite)
    with pytest.raises(FAILED):
        Malicious(cfg=cfg, run_id="f2", links=links, rounds=2).run()
    # Both refused on the envelope's round before anything is opened (the aggregator's
    # signature, over the first sum's round, would not hold either).
    assert links.errors["m0"] == ["ProtocolError: message for round 0, expected round 1"] * 2
    stages_1 = [s for r, s in links.stages["m0"] if r == 1]
    assert stages_1 == [NONCE]                  # only its fresh nonce left m0 in the second sum
    assert all(_unreleased(w, 1) for w in workers.values())


def test_shim_passes_an_honest_run_through():
    # The harness itself changes nothing unless told to: an honest run completes through it.
    cfg = _cfg(3)
    workers = {m: MarketWorker(market=m, rules=MarketRules(backends=frozenset({"masking"})))
               for m in _names(3)}
    res = Malicious(cfg=cfg, run_id="ok", links=Shim(workers, lambda m, s, h, b: b), rounds=2).run()
    assert not res["dropped"]
    assert all(v["max_abs_error"] < 1e-6 for v in res["markets"].values())
    assert all(w.result is not None for w in workers.values())


# -- (b) without a digest obtained in advance: a split roster shows in the markets' records -------

def test_b_flower_split_roster_is_exposed_by_the_markets_pinned_digests(tmp_path):
    # No market pins a roster in advance (workers started without --roster or --roster-sha256):
    # each trusts the first roster it is shown. The aggregator shows m1 a roster with a puppet
    # market and the matching federation size. The records the markets keep on their own side
    # disagree, and `same_roster` (what `flower local` checks before it reports) refuses.
    from fedmm_secure.runtime.flower.local import same_roster
    from fedmm_secure.runtime.flower.wire import pack_json, unpack_json

    cfg = _cfg(3)
    workers = {m: MarketWorker(market=m, rules=MarketRules(backends=frozenset({"masking"})),
                               roster_out=tmp_path / f"{m}.sha256") for m in _names(3)}

    class Split(Shim):
        def _call(self, m, kind, payload, raw=False):
            if kind == "start" and m == "m1":
                msg = unpack_json(payload)
                msg["roster"] = dict(msg["roster"], m9=msg["roster"]["m2"])
                payload = pack_json(dict(msg, n_markets=4))
            return super()._call(m, kind, payload, raw)

    with pytest.raises(FAILED):
        Malicious(cfg=cfg, run_id="b-split", links=Split(workers)).run()
    pinned = {m: (tmp_path / f"{m}.sha256").read_text().strip() for m in workers}
    assert pinned["m0"] == pinned["m2"] != pinned["m1"]
    with pytest.raises(AbortError, match="different rosters"):
        same_roster(pinned)
    with pytest.raises(AbortError, match="different rosters"):   # a market left out changes nothing
        same_roster(dict(pinned, m2=None))
    assert same_roster(dict(pinned, m1=None)) == pinned["m0"]
    with pytest.raises(AbortError, match="no market"):
        same_roster({m: None for m in pinned})
    # An honest run: one digest, the one every market recorded.
    honest = {m: MarketWorker(market=m, rules=MarketRules(backends=frozenset({"masking"}))) for m in _names(3)}
    Malicious(cfg=cfg, run_id="b-ok", links=Shim(honest)).run()
    assert same_roster({m: w.pinned_roster for m, w in honest.items()}) == honest["m0"].pinned_roster
