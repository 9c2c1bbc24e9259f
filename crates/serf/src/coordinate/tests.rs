use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;

fn coordinate(vec: [f64; 8], error: f64, adjustment: f64, height: f64) -> Coordinate {
    Coordinate {
        vec: vec.to_vec(),
        error,
        adjustment,
        height,
    }
}

fn close(actual: f64, expected: f64, what: &str) {
    assert!(
        (actual - expected).abs() < 1e-12,
        "{what}: got {actual:e}, expected {expected:e}"
    );
}

#[test]
fn fresh_coordinate_matches_go_defaults() {
    let fresh = Coordinate::new(&Config::default());
    assert_eq!(fresh.vec, vec![0.0; 8]);
    assert_eq!(fresh.error, 1.5);
    assert_eq!(fresh.adjustment, 0.0);
    assert_eq!(fresh.height, 1e-5);
    assert!(fresh.is_valid());
}

#[test]
fn distance_adds_heights_and_adjustments() {
    let check = |a: Coordinate, b: Coordinate, expected_nanos: u64| {
        assert_eq!(
            a.distance_to(&b),
            Some(Duration::from_nanos(expected_nanos)),
            "{a:?} -> {b:?}"
        );
    };
    let mut three_four = [0.0; 8];
    three_four[0] = 3.0;
    three_four[1] = 4.0;
    // |(3,4)| = 5, heights 0.25 + 0.25, adjustments 0.125 + 0.125 (exact in binary).
    check(
        coordinate(three_four, 1.0, 0.125, 0.25),
        coordinate([0.0; 8], 1.0, 0.125, 0.25),
        5_750_000_000,
    );
    // A negative adjusted distance falls back to the raw distance (5.5 s).
    check(
        coordinate(three_four, 1.0, -3.0, 0.25),
        coordinate([0.0; 8], 1.0, -3.0, 0.25),
        5_500_000_000,
    );
    // Go truncates to whole nanoseconds: 1.5e-9 s -> 1 ns.
    check(
        coordinate([0.0; 8], 1.0, 0.0, 0.75e-9),
        coordinate([0.0; 8], 1.0, 0.0, 0.75e-9),
        1,
    );
}

#[test]
fn incompatible_or_invalid_coordinates_are_refused() {
    let mut client = Client::new(Config::default());
    let mut rng = StdRng::seed_from_u64(1);
    let mut short = Coordinate::new(&Config::default());
    short.vec.pop();
    assert_eq!(client.distance_to(&short), None);
    assert!(matches!(
        client.update("b", &short, Duration::from_millis(1), &mut rng),
        Err(UpdateError::Dimensions {
            got: 7,
            expected: 8,
            ..
        })
    ));
    let mut nan = Coordinate::new(&Config::default());
    nan.height = f64::NAN;
    assert!(matches!(
        client.update("b", &nan, Duration::from_millis(1), &mut rng),
        Err(UpdateError::Invalid { .. })
    ));
    let fresh = Coordinate::new(&Config::default());
    let err = client
        .update("b", &fresh, Duration::from_millis(10_001), &mut rng)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "round trip time 10.001s to b is not below 10s"
    );
    assert_eq!(
        client.coordinate(),
        &fresh,
        "refused samples change nothing"
    );
}

/// One update between two fresh nodes 10 ms apart, worked out by hand from client.go:
/// dist = 2e-5 (two heights), wrongness = 0.998, weight = 0.5,
/// error = 0.25*0.5*0.998 + 1.5*(1 - 0.125) = 1.43725,
/// force = 0.125 * (0.01 - 2e-5) = 0.0012475 along a random unit vector (height unchanged,
/// since the two coincide), adjustment = (0.01 - (0.0012475 + 2e-5)) / 40 = 0.0002183125,
/// gravity: origin distance 0.0014858125 s, truncated to 1485812 ns,
/// force = -(0.001485812 / 150)^2, pulling the vector back; height stays at the minimum.
#[test]
fn first_update_between_fresh_nodes_matches_hand_computation() {
    let mut client = Client::new(Config::default());
    let mut rng = StdRng::seed_from_u64(7);
    let other = Coordinate::new(&Config::default());
    let updated = client
        .update("b", &other, Duration::from_millis(10), &mut rng)
        .expect("valid sample")
        .clone();
    close(updated.error, 1.43725, "error");
    close(updated.adjustment, 0.0002183125, "adjustment");
    close(updated.height, 1e-5, "height");
    let gravity = (0.001485812f64 / 150.0).powi(2);
    let length = updated.vec.iter().map(|c| c * c).sum::<f64>().sqrt();
    close(length, 0.0012475 - gravity, "vector length");
}

/// Two nodes that keep measuring each other converge to a distance close to the RTT.
#[test]
fn two_nodes_converge_to_their_rtt() {
    let mut a = Client::new(Config::default());
    let mut b = Client::new(Config::default());
    let mut rng = StdRng::seed_from_u64(3);
    let rtt = Duration::from_millis(20);
    for _ in 0..200 {
        let b_coordinate = b.coordinate().clone();
        a.update("b", &b_coordinate, rtt, &mut rng).expect("valid");
        let a_coordinate = a.coordinate().clone();
        b.update("a", &a_coordinate, rtt, &mut rng).expect("valid");
    }
    let estimate = a.distance_to(b.coordinate()).expect("same dimensions");
    let error = (estimate.as_secs_f64() - rtt.as_secs_f64()).abs();
    assert!(error < 0.001, "estimate {estimate:?} for rtt {rtt:?}");
    assert!(
        a.coordinate().error < 0.5,
        "error shrinks: {}",
        a.coordinate().error
    );
}

#[test]
fn latency_filter_takes_the_median_of_the_last_three() {
    let check = |samples_ms: &[u64], expected_ms: f64| {
        let mut client = Client::new(Config::default());
        let mut last = 0.0;
        for &ms in samples_ms {
            last = client.latency_filter("b", ms as f64 / 1000.0);
        }
        close(last, expected_ms / 1000.0, &format!("{samples_ms:?}"));
    };
    check(&[10], 10.0);
    check(&[10, 30], 30.0);
    check(&[10, 30, 20], 20.0);
    check(&[10, 30, 20, 500], 30.0);
    check(&[500, 1, 2, 3], 2.0);
}

#[test]
fn gravity_alone_pulls_towards_the_origin() {
    let config = Config::default();
    let mut client = Client::new(config);
    let mut rng = StdRng::seed_from_u64(9);
    let mut far = [0.0; 8];
    far[0] = 30.0;
    client
        .set_coordinate(coordinate(far, 1.5, 0.0, 1e-5))
        .expect("valid");
    client.update_gravity(&mut rng);
    // distance from origin = 30 + 2e-5 (heights); force = -(30.00002 / 150)^2.
    let force = (30.00002f64 / 150.0).powi(2);
    close(client.coordinate().vec[0], 30.0 - force, "x");
}
