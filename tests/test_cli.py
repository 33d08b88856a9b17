import logging

import pytest

from selftune.cli import quiet_libraries


@pytest.fixture
def liger_logger():
    logger = logging.getLogger("liger_kernel.backends.registry")
    parent = logging.getLogger("liger_kernel")
    level = parent.level
    yield logger
    parent.setLevel(level)


def test_library_warnings_only_under_debug(liger_logger):
    quiet_libraries(debug=False)
    assert not liger_logger.isEnabledFor(logging.WARNING)
    logging.getLogger("liger_kernel").setLevel(logging.NOTSET)
    quiet_libraries(debug=True)
    assert liger_logger.isEnabledFor(logging.WARNING)
