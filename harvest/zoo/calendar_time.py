"""Family ``calendar``: weekdays, months, clock times and durations (one member in Japanese)."""

from __future__ import annotations

from harvest.zoo._spec import MONTHS, WEEKDAYS, family, procedural, rg

add = family("calendar", "Weekdays, months, clock times and durations.")

_JA_WEEKDAYS = ("月曜日", "火曜日", "水曜日", "木曜日", "金曜日", "土曜日", "日曜日")


def _weekday_after(rng):
    day, n = rng.randrange(7), rng.randint(1, 60)
    return f"Today is {WEEKDAYS[day]}. What day of the week will it be in {n} days?", WEEKDAYS[(day + n) % 7]


def _weekday_before(rng):
    day, n = rng.randrange(7), rng.randint(1, 60)
    return f"If today is {WEEKDAYS[day]}, what day of the week was it {n} days ago?", WEEKDAYS[(day - n) % 7]


def _month_offset(rng):
    month, n = rng.randrange(12), rng.randint(1, 24)
    if rng.random() < 0.5:
        return f"Which month is {n} months after {MONTHS[month]}?", MONTHS[(month + n) % 12]
    return f"Which month is {n} months before {MONTHS[month]}?", MONTHS[(month - n) % 12]


def _hours_to_minutes(rng):
    h, m = rng.randint(1, 9), rng.randint(1, 59)
    return f"How many minutes are in {h} hours and {m} minutes?", str(60 * h + m)


def _add_minutes(rng):
    start, delta = rng.randrange(24 * 60), rng.randint(5, 150)
    end = (start + delta) % (24 * 60)
    return (f"What time is it {delta} minutes after {start // 60:02d}:{start % 60:02d}? Answer as HH:MM.",
            f"{end // 60:02d}:{end % 60:02d}")


def _to_24h(rng):
    hour, minute, pm = rng.randint(1, 12), rng.randrange(60), rng.random() < 0.5
    h24 = hour % 12 + (12 if pm else 0)
    return f"Write {hour}:{minute:02d} {'PM' if pm else 'AM'} in 24-hour time.", f"{h24:02d}:{minute:02d}"


def _seconds(rng):
    m, s = rng.randint(1, 20), rng.randint(1, 59)
    return f"How many seconds are in {m} minutes and {s} seconds?", str(60 * m + s)


def _weeks_to_days(rng):
    w, d = rng.randint(1, 99), rng.randint(1, 6)
    return f"How many days are in {w} weeks and {d} days?", str(7 * w + d)


def _age(rng):
    born, year = rng.randint(1940, 2015), rng.randint(2016, 2030)
    return f"Someone was born in {born}. How old do they turn in {year}?", str(year - born)


def _ja_weekday_after(rng):
    day, n = rng.randrange(7), rng.randint(1, 60)
    return f"今日は{_JA_WEEKDAYS[day]}です。{n}日後は何曜日ですか？", _JA_WEEKDAYS[(day + n) % 7]


add("weekday", "Name the weekday of a date in 2022.", "exact",
    rg("calendar_arithmetic", tasks=["weekday_of_date"]), "reasoning_gym:calendar_arithmetic")
add("time_difference", "Compute the time between two clock times as HH:MM.", "exact",
    rg("time_intervals", task_types=["time"]), "reasoning_gym:time_intervals")
add("weekday_after", "The weekday some days after a given weekday.", "exact", procedural(_weekday_after), "procedural")
add("weekday_before", "The weekday some days before a given weekday.", "exact", procedural(_weekday_before), "procedural")
add("month_offset", "The month some months after or before a given month.", "exact",
    procedural(_month_offset), "procedural")
add("hours_to_minutes", "Hours and minutes as minutes.", "numeric", procedural(_hours_to_minutes), "procedural")
add("add_minutes", "A clock time some minutes later, as HH:MM.", "exact", procedural(_add_minutes), "procedural")
add("to_24_hour", "A 12-hour clock time in 24-hour form.", "exact", procedural(_to_24h), "procedural")
add("minutes_to_seconds", "Minutes and seconds as seconds.", "numeric", procedural(_seconds), "procedural")
add("weeks_to_days", "Weeks and days as days.", "numeric", procedural(_weeks_to_days), "procedural")
add("age_in_year", "Someone's age in a given year from their birth year.", "numeric", procedural(_age), "procedural")
add("ja_weekday_after", "The weekday some days after a given weekday (Japanese prompt).", "exact",
    procedural(_ja_weekday_after), "procedural", language="ja")
