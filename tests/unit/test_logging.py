"""Logging set-up: gRPC's report of an answer it could not send to a call that had already ended."""

import logging

from grpc._cython import cygrpc

from loramux.server.cli import CallEndedFirst, setup_logging


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append((record.levelname, self.format(record), record.exc_info))


def test_an_answer_to_a_call_that_ended_first_is_one_info_line_and_other_errors_keep_their_traceback():
    logger, sink = logging.getLogger("test.grpc.core"), Records()
    logger.addHandler(sink)
    logger.addFilter(CallEndedFirst())
    logger.propagate = False
    try:
        for error in (cygrpc.ExecuteBatchError('Failed "execute_batch"'), RuntimeError("a real fault")):
            try:
                raise error
            except Exception:  # noqa: BLE001 - logged as gRPC logs it
                logger.exception("%s raised in core by servicer method [%s]", type(error).__name__, "/loramux.v1.LoraMux/Generate")
    finally:
        logger.removeHandler(sink)
    (level, text, exc), (other_level, other_text, other_exc) = sink.records
    assert level == "INFO" and exc is None and "Traceback" not in text
    assert text == ("ExecuteBatchError raised in core by servicer method [/loramux.v1.LoraMux/Generate]: the call ended "
                    "before its answer was sent (the client cancelled, or its deadline passed)")
    assert other_level == "ERROR" and other_exc is not None and "Traceback" in other_text


def test_serving_installs_it_on_grpcs_core_logger_once():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    core = logging.getLogger("grpc._cython.cygrpc")
    filters = core.filters[:]
    try:
        setup_logging("INFO", "text")
        setup_logging("INFO", "json")
        assert sum(isinstance(f, CallEndedFirst) for f in core.filters) == 1
    finally:
        root.handlers[:], core.filters[:] = handlers, filters
        root.setLevel(level)
