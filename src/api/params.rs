//! The coercions Backend.AI's storage proxy applies to manager-API fields (trafaret's `ToInt`
//! and `ToBool`), for `#[serde(deserialize_with = ...)]`. The manager sends some numbers as
//! strings (`"size": "12"` on `/folder/file/upload`), so a plain `u64` field would refuse what
//! the Python proxy takes.
//!
//! `ToInt` takes an integer, an integral float (`12.0`) or a decimal string with an optional
//! sign and surrounding blanks (`" 12 "`, `"-3"`). `ToBool` takes booleans, `1`/`0`, `null`
//! (false) and the words `true/false`, `yes/no`, `on/off`, `y/n`, `t/f` in any case.

use serde::de::{Deserializer, Error, Unexpected, Visitor};

struct IntVisitor;

impl Visitor<'_> for IntVisitor {
    type Value = i128;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an integer, or a string holding one")
    }

    fn visit_i64<E: Error>(self, v: i64) -> Result<i128, E> {
        Ok(v.into())
    }

    fn visit_u64<E: Error>(self, v: u64) -> Result<i128, E> {
        Ok(v.into())
    }

    fn visit_f64<E: Error>(self, v: f64) -> Result<i128, E> {
        // Integral floats only, and only where they are exact.
        if v.fract() == 0.0 && v.abs() < 2f64.powi(63) {
            Ok(v as i128)
        } else {
            Err(E::invalid_value(Unexpected::Float(v), &self))
        }
    }

    fn visit_str<E: Error>(self, v: &str) -> Result<i128, E> {
        let t = v.trim();
        let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(E::invalid_value(Unexpected::Str(v), &self));
        }
        t.parse::<i128>()
            .map_err(|_| E::invalid_value(Unexpected::Str(v), &self))
    }
}

fn int<'de, D: Deserializer<'de>>(d: D) -> Result<i128, D::Error> {
    d.deserialize_any(IntVisitor)
}

/// `ToInt` into a non-negative `u64`.
pub fn to_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = int(d)?;
    u64::try_from(v).map_err(|_| {
        D::Error::custom(if v < 0 {
            format!("must not be negative (got {v})")
        } else {
            format!("too large (got {v})")
        })
    })
}

/// `ToInt` into an `i64` (quota limits: zero or below means no limit).
pub fn to_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let v = int(d)?;
    i64::try_from(v).map_err(|_| D::Error::custom(format!("out of range (got {v})")))
}

/// `null | ToInt` into an optional non-negative `u64`.
pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct Opt;
    impl<'de> Visitor<'de> for Opt {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("null, an integer, or a string holding one")
        }
        fn visit_none<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            to_u64(d).map(Some)
        }
    }
    d.deserialize_option(Opt)
}

struct BoolVisitor;

impl Visitor<'_> for BoolVisitor {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a boolean (true/false, 1/0, yes/no, on/off)")
    }

    fn visit_bool<E: Error>(self, v: bool) -> Result<bool, E> {
        Ok(v)
    }

    fn visit_unit<E: Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_none<E: Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_i64<E: Error>(self, v: i64) -> Result<bool, E> {
        match v {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(E::invalid_value(Unexpected::Signed(v), &self)),
        }
    }

    fn visit_u64<E: Error>(self, v: u64) -> Result<bool, E> {
        match v {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(E::invalid_value(Unexpected::Unsigned(v), &self)),
        }
    }

    fn visit_str<E: Error>(self, v: &str) -> Result<bool, E> {
        match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" | "y" | "t" => Ok(true),
            "false" | "0" | "no" | "off" | "n" | "f" => Ok(false),
            _ => Err(E::invalid_value(Unexpected::Str(v), &self)),
        }
    }
}

/// `ToBool`.
pub fn to_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    d.deserialize_any(BoolVisitor)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct N {
        #[serde(deserialize_with = "super::to_u64")]
        n: u64,
    }

    #[derive(Deserialize)]
    struct I {
        #[serde(deserialize_with = "super::to_i64")]
        n: i64,
    }

    #[derive(Deserialize)]
    struct O {
        #[serde(default, deserialize_with = "super::opt_u64")]
        n: Option<u64>,
    }

    #[derive(Deserialize)]
    struct B {
        #[serde(deserialize_with = "super::to_bool")]
        b: bool,
    }

    fn n(json: &str) -> Result<u64, String> {
        serde_json::from_str::<N>(json)
            .map(|v| v.n)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn to_int_takes_what_trafaret_takes() {
        assert_eq!(n(r#"{"n": 12}"#), Ok(12));
        assert_eq!(n(r#"{"n": "12"}"#), Ok(12));
        assert_eq!(n(r#"{"n": " 12 "}"#), Ok(12));
        assert_eq!(n(r#"{"n": "+7"}"#), Ok(7));
        assert_eq!(n(r#"{"n": 12.0}"#), Ok(12));
        assert_eq!(n(r#"{"n": "18446744073709551615"}"#), Ok(u64::MAX));
        for bad in [
            r#"{"n": "12.5"}"#,
            r#"{"n": "1e3"}"#,
            r#"{"n": 12.5}"#,
            r#"{"n": null}"#,
            r#"{"n": ""}"#,
            r#"{"n": "-"}"#,
            r#"{"n": -1}"#,
            r#"{"n": "-1"}"#,
            r#"{"n": [1]}"#,
        ] {
            assert!(n(bad).is_err(), "{bad}");
        }
        let neg: I = serde_json::from_str(r#"{"n": "-3"}"#).unwrap();
        assert_eq!(neg.n, -3);
        let o: O = serde_json::from_str(r#"{"n": null}"#).unwrap();
        assert_eq!(o.n, None);
        let o: O = serde_json::from_str(r#"{}"#).unwrap();
        assert_eq!(o.n, None);
        let o: O = serde_json::from_str(r#"{"n": "5"}"#).unwrap();
        assert_eq!(o.n, Some(5));
    }

    #[test]
    fn to_bool_takes_what_trafaret_takes() {
        let b = |j: &str| serde_json::from_str::<B>(j).map(|v| v.b).ok();
        assert_eq!(b(r#"{"b": true}"#), Some(true));
        assert_eq!(b(r#"{"b": "Yes"}"#), Some(true));
        assert_eq!(b(r#"{"b": 1}"#), Some(true));
        assert_eq!(b(r#"{"b": null}"#), Some(false));
        assert_eq!(b(r#"{"b": "off"}"#), Some(false));
        assert_eq!(b(r#"{"b": 2}"#), None);
        assert_eq!(b(r#"{"b": ""}"#), None);
    }
}
