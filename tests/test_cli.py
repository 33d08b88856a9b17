import logging

import pytest

from selftune.cli import quiet_libraries


@pytest.fixture
def liger_logger():
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("liger_kernel.backends.registry")
    parent = logging.getLogger("liger_kernel")
    level, hf_level = parent.level, hf_logging.get_verbosity()
    yield logger
    parent.setLevel(level)  # the rest of the session logs as before
    hf_logging.set_verbosity(hf_level)
    hf_logging.enable_progress_bar()


def test_library_warnings_only_under_debug(liger_logger):
    quiet_libraries(debug=False)
    assert not liger_logger.isEnabledFor(logging.WARNING)
    logging.getLogger("liger_kernel").setLevel(logging.NOTSET)
    quiet_libraries(debug=True)
    assert liger_logger.isEnabledFor(logging.WARNING)
