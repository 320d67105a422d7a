"""ThreadFlag: raised inside its block only, restored after nesting and after an error, and
never seen raised by another thread."""

import threading

import pytest

from keras_gemma.layers.thread_flag import ThreadFlag


def test_raised_in_its_block_and_restored_after_nesting_and_errors():
    flag = ThreadFlag()
    assert not flag.is_raised()
    with flag.raised():
        with flag.raised():
            assert flag.is_raised()
        assert flag.is_raised()  # the inner block restores the outer one's value
    assert not flag.is_raised()
    with pytest.raises(RuntimeError):
        with flag.raised():
            raise RuntimeError("inside")
    assert not flag.is_raised()


def test_another_thread_does_not_see_it_raised():
    flag = ThreadFlag()
    seen = []
    with flag.raised():
        thread = threading.Thread(target=lambda: seen.append(flag.is_raised()))
        thread.start()
        thread.join()
    assert seen == [False]
