"""Flower's legacy Strategy API fed through `Rounds`: server.py's strategies, and the App's under SecAgg+."""

import argparse
from logging import WARNING

import flwr as fl
from flwr.common import Code, FitRes, Status, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import strategy as legacy

import flags
from federation import config, privacy, screening
from federation.privacy import BudgetExhausted
from federation.rounds import Rounds


def flower_strategy(args: argparse.Namespace, initial: fl.common.Parameters) -> legacy.Strategy:
    """The chosen strategy, Flower's own implementation of it."""
    sampling = {
        "fraction_fit": args.fraction_fit,
        "fraction_evaluate": args.fraction_fit,
        "min_fit_clients": args.min_clients,
        "min_evaluate_clients": args.min_clients,
        "min_available_clients": args.min_clients,
        "initial_parameters": initial,
        "fit_metrics_aggregation_fn": screening.weighted_average,
    }
    f = args.num_malicious
    inner = {
        "fedavg": lambda: legacy.FedAvg(**sampling),
        "fedprox": lambda: legacy.FedProx(**sampling, proximal_mu=args.proximal_mu),
        "fedadam": lambda: legacy.FedAdam(**sampling, eta=args.server_lr, tau=config.FEDADAM_TAU),
        "fedmedian": lambda: legacy.FedMedian(**sampling),
        "fedtrimmedavg": lambda: legacy.FedTrimmedAvg(**sampling, beta=args.trim_beta),
        "krum": lambda: legacy.Krum(**sampling, num_malicious_clients=f),
        # Bulyan's first rule is Krum, whose `to_keep` legacy Bulyan does not pass by itself (flwr 1.42)
        "bulyan": lambda: legacy.Bulyan(**sampling, num_malicious_clients=f, to_keep=0),
    }[args.strategy]()
    if args.dp == "none":
        return inner
    # Central DP, Flower's wrapper; how many clients it averages is set once they are sampled
    wrapper = {
        "server-clipping": legacy.DifferentialPrivacyServerSideFixedClipping,
        "client-clipping": legacy.DifferentialPrivacyClientSideFixedClipping,
    }[args.dp]
    return wrapper(inner, args.dp_noise, args.dp_clip_norm, num_sampled_clients=1)


class NoClients(Exception):
    """The round cannot get the clients it needs: they left, or did not come within --client-wait."""


class Screened(legacy.Strategy):
    """Flower's strategy, fed only screened replies; `Rounds` keeps the records.

    Rounds are numbered from the run's first round on, so a resumed run keeps its numbering. `signals`:
    server.py's, Flower's SIGINT/SIGTERM handlers with their exit kept. `summed`: under SecAgg+, where every
    result holds the same sum of the clients' updates and none can be taken out of it.
    """

    def __init__(
        self, inner: legacy.Strategy, rounds: Rounds, signals: flags.NotedSignals | None = None, summed: bool = False
    ) -> None:
        self.inner, self.rounds, self.offset = inner, rounds, rounds.done
        self.exhausted: str | None = None  # why the run stopped early: its privacy budget
        self.wraps, self.summed = signals is not None, summed
        self.sampled = 0  # clients the round's training went to
        self.signals = signals or flags.NotedSignals()  # unwrapped: never received

    def initialize_parameters(self, client_manager):
        if self.wraps:
            self.signals.wrap()  # Flower has installed its handlers by now
        return ndarrays_to_parameters(self.rounds.weights)

    def configure_fit(self, server_round, parameters, client_manager):
        self.signals.stop_if_received()
        if self.exhausted:
            return []  # Flower runs the rounds left as empty ones, then tells its clients to disconnect
        instructions = self.inner.configure_fit(server_round + self.offset, parameters, client_manager)
        self.sampled = len(instructions)
        for _, ins in instructions:
            ins.config.update(self.rounds.fit_config())
        try:
            if self.rounds.privacy:
                self.inner.num_sampled_clients = len(instructions)
                self.rounds.sampled(client_manager.num_available(), len(instructions))
            self.rounds.begin(server_round + self.offset)
        except BudgetExhausted as e:
            self.exhausted = str(e)
            return []
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        updates = []
        for proxy, res in results:
            try:
                arrays = parameters_to_ndarrays(res.parameters)
                if self.summed:  # SecAgg+ hands the sum back dequantised, in float64
                    arrays = self.rounds.layout.cast(arrays)
                    res.parameters = ndarrays_to_parameters(arrays)
            except (ValueError, OSError, EOFError):  # bytes that are no arrays at all
                arrays = []
            updates.append((proxy.cid, arrays, res.num_examples, dict(res.metrics)))
        accepted = []
        for i, clipped in self.rounds.screen_updates(updates, summed=self.summed):
            proxy, res = results[i]
            if clipped is not None:
                res = FitRes(res.status, ndarrays_to_parameters(clipped), res.num_examples, res.metrics)
            accepted.append((proxy, res))
        if self.summed and len(accepted) < len(results):  # a part of a sum cannot be taken out: all or nothing
            log(WARNING, "The round's secure sum is rejected whole: %s of its %s parts failed their checks",
                len(results) - len(accepted), len(results))  # fmt: skip
            accepted = []
        rejected = len(results) - len(accepted) + len(failures)
        if self.summed:  # SecAgg+ lists a client lost mid-round among its failures once per stage it missed
            rejected = self.sampled - len(accepted)
        inputs, dropped = accepted, failures
        if self.rounds.dp_sample:  # central DP: a mean of exactly m updates with equal weights
            unchanged = ndarrays_to_parameters(privacy.stand_in(self.rounds.weights))  # a missing update: zero
            inputs = [(p, FitRes(r.status, r.parameters, 1, r.metrics)) for p, r in accepted]
            inputs += [(None, FitRes(Status(Code.OK, ""), unchanged, 1, {}))] * (self.rounds.dp_sample - len(inputs))
            dropped = []
        parameters, metrics = (None, {})
        if inputs:
            parameters, metrics = self.inner.aggregate_fit(server_round + self.offset, inputs, dropped)
        weights = parameters_to_ndarrays(parameters) if parameters is not None else None
        self.rounds.trained(weights, [(r.num_examples, dict(r.metrics)) for _, r in accepted], rejected)
        return ndarrays_to_parameters(self.rounds.weights), metrics

    def evaluate(self, server_round, parameters):
        self.signals.stop_if_received()
        if server_round == 0 or self.exhausted:
            return None  # the starting model is no round's result; a stopped run has none
        if "fit_clients" not in self.rounds.row:  # SecAgg+ halted (too few clients left): the model is kept
            self.rounds.trained(None, [], 0)
        result = self.rounds.central()
        return None if result is None else (result[0], {"accuracy": result[1]})

    def configure_evaluate(self, server_round, parameters, client_manager):
        self.signals.stop_if_received()
        if self.exhausted:
            return []
        try:
            instructions = self.inner.configure_evaluate(server_round + self.offset, parameters, client_manager)
            for _, ins in instructions:
                ins.config.update(self.rounds.eval_config())
        except NoClients:  # the round's model is trained and tested centrally: on record before the server ends
            self.rounds.end()
            raise
        if not instructions:  # Flower skips aggregate_evaluate then: the round ends here
            self.rounds.end()
        return instructions

    def aggregate_evaluate(self, server_round, results, failures):
        accepted = [
            (r.num_examples, r.loss, dict(r.metrics))
            for proxy, r in results
            if self.rounds.screen_evaluation(proxy.cid, r.loss, r.num_examples, dict(r.metrics))
        ]
        loss, metrics = self.rounds.evaluated(accepted)
        self.rounds.end()
        return loss, metrics
