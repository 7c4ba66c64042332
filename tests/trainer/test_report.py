"""`kiln report`'s text output."""


def test_report_sparkline_spans_the_whole_run():
    from kiln.trainer.report import BARS, sparkline

    short = sparkline([15.0 - i for i in range(15)])  # the default run's 15 records: 15 bars
    assert len(short) == 15 and short[0] == BARS[-1] and short[-1] == BARS[0]
    long = sparkline([float(i) for i in range(600)], width=60)
    assert len(long) == 60 and long[0] == BARS[0] and long[-1] == BARS[-1]
