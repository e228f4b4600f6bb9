"""rd.files: the background priority that jobs and the studio's export run at."""

import pytest

from rd.files import check_background_priority


@pytest.mark.parametrize("good", ["idle", "0", "10", "19"])
def test_background_priorities_accepted(good):
    assert check_background_priority(good) == good


@pytest.mark.parametrize("bad", ["", "-1", "20", "low", "1.5"])
def test_other_priorities_refused_with_the_choices(bad):
    with pytest.raises(ValueError, match="'idle' or a niceness from 0 to 19"):
        check_background_priority(bad)
